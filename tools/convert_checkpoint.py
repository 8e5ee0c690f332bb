"""Convert checkpoints between Hugging Face and Megatron-Core; see ``megatron_v2pe/convert/cli.py``.

    python tools/convert_checkpoint.py hf-to-megatron --hf-layout internvl2 --input InternVL2-2B \\
        --output ckpt/init --preset internvl2_2b
    python tools/convert_checkpoint.py megatron-to-hf --hf-layout hf --input ckpt/run --output exported
"""

from __future__ import annotations

import sys

from megatron_v2pe.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
