"""Optional GPU packages (Transformer Engine, apex, flash-attn), imported lazily.

They ship in NGC containers and never install on a CPU-only host, so nothing imports them at module
load; a feature that needs one asks for it here and gets an error that names the package and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

_PIP_NAMES = {
    "transformer_engine": "transformer-engine",
    "apex": "apex",
    "flash_attn": "flash-attn",
}


def is_available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` or raise an ImportError that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = _PIP_NAMES.get(module.split(".")[0], module)
        raise ImportError(
            f"{feature} needs the '{package}' package, which is not importable here ({err}). "
            "It ships in the NGC PyTorch container (see docker/); on a CPU-only host choose a "
            "configuration that does not use it."
        ) from err
