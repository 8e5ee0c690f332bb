"""What is stored beside the weights: ``vlm_config.json`` (the architecture, so that a checkpoint loads
without naming it) and ``tokenizer/`` (the tokenizer files a converted model came with).

A training run writes ``vlm_config.json`` into its ``checkpoint.save``, beside the ``iter_NNNNNNN``
directories; a model-only checkpoint holds both in its own directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_v2pe.checkpoint.errors import CheckpointError
from megatron_v2pe.model.architecture import config_differences
from megatron_v2pe.model.presets import ImageFormat, LanguageConfig, VisionConfig, VLMConfig

MODEL_CONFIG_FILE = "vlm_config.json"
TOKENIZER_DIR = "tokenizer"


def config_to_dict(config: VLMConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> VLMConfig:
    """The inverse of ``config_to_dict``; files written before ``image_format`` existed get its defaults."""
    parts = {"vision": VisionConfig(**data["vision"]), "language": LanguageConfig(**data["language"])}
    if "image_format" in data:
        parts["image_format"] = ImageFormat(**data["image_format"])
    return VLMConfig(**{**data, **parts})


def write_model_config(config: VLMConfig, directory: Path) -> None:
    """``vlm_config.json``: what a checkpoint is loaded as when no architecture is given."""
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def read_model_config(path: Path) -> VLMConfig:
    """A ``vlm_config.json`` file."""
    return config_from_dict(json.loads(path.read_text()))


def saved_model_config(*directories: Path) -> VLMConfig | None:
    """The ``vlm_config.json`` of the first of ``directories`` that holds one; None if none does."""
    found = next((d / MODEL_CONFIG_FILE for d in directories if (d / MODEL_CONFIG_FILE).is_file()), None)
    return read_model_config(found) if found is not None else None


def tokenizer_dir(directory: str | Path) -> Path:
    """Where a model-only checkpoint keeps its tokenizer files."""
    return Path(directory) / TOKENIZER_DIR


def check_architecture(root: str | Path, model: VLMConfig) -> None:
    """Refuse to resume into another architecture (the ``vlm_config.json`` beside the checkpoints)."""
    saved = saved_model_config(Path(root))
    differences = config_differences(saved, model) if saved is not None else []
    if differences:
        raise CheckpointError(
            f"the checkpoints in {root} hold another architecture than this config builds "
            f"({'; '.join(d.replace(' expected', ' configured') for d in differences)}): resume with the "
            "model settings they were trained with, or choose another checkpoint.save"
        )
