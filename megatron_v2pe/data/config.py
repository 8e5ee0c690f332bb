"""What the data pipeline reads: the ``data:`` section of the training YAML, plus the few fields that a
program sets (``in_code``: the run's seed from ``training.seed``, finite epochs for evaluation, ...).

``pad_multiple`` None means "the layout's": the trainer fills in its layout's multiple (with the seed)
before building a loader; a loader built without one pads like a single process (packing.PackConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_v2pe.data.conversation import SystemMessage
from megatron_v2pe.data.packing import LossWeighting, OverLong, PackConfig
from megatron_v2pe.model.presets import TILE_BUDGETS, TileBudget


def in_code(default: Any) -> Any:
    """A field that programs set and the YAML section does not take (the YAML reader skips it)."""
    return field(default=default, metadata={"yaml": False})


@dataclass(frozen=True)
class DatasetSpec:
    """Shard URL patterns (see source.expand_urls) and the dataset's share of the mix; in YAML also a
    bare string of patterns."""

    shards: str | tuple[str, ...]
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    tokenizer: str | None = None  # a sentencepiece .model file or a tokenizer directory
    max_seq_len: int = 32768  # tokens per pack (after padding)
    max_tiles: int = 128  # tiles per pack
    max_image_tiles: int | None = None  # grid tiles per image (max_dynamic_patch); None: the model's
    # per_image: each image up to max_image_tiles (V2PE's recipe); per_sample: n images get
    # max(1, max_image_tiles // n) each (InternVL's); None: the model's
    tile_budget: TileBudget | None = None
    pad_multiple: int | None = None  # sub-sample padding; None: the layout's (packing.padding_multiple).
    # Fix it to the largest layout a run will move between, so that packs do not change on resharding.
    delta_policy: str = "random"  # none | fixed:<δ> | random | auto:<window> (v2pe/positions.py)
    loss_weighting: LossWeighting = "square"  # square: 1/sqrt(n) per sub-sample, the paper's
    over_long: OverLong = "drop"
    pack_buffer_size: int = 32
    shuffle_buffer: int = 64
    num_workers: int = 2
    seed: int = in_code(1234)
    use_thumbnail: bool | None = in_code(None)  # None: the model's (VLMConfig.image_format)
    system_message: str | None | SystemMessage = in_code(SystemMessage.TEMPLATE)  # None: no system turn
    num_epochs: int | None = in_code(None)  # None: cycle forever (training); n: stop after n epochs
    prefetch_factor: int = in_code(2)

    def pack_config(self) -> PackConfig:
        """The packer's share of the section (its own checks included)."""
        padding = {} if self.pad_multiple is None else {"pad_multiple": self.pad_multiple}
        return PackConfig(
            max_seq_len=self.max_seq_len,
            max_tiles=self.max_tiles,
            buffer_size=self.pack_buffer_size,
            loss_weighting=self.loss_weighting,
            over_long=self.over_long,
            delta_policy=self.delta_policy,
            **padding,
        )

    def check(self) -> None:
        """Raise ValueError for a configuration the loader cannot run (the trainer has said which key
        to change before this)."""
        if not self.datasets:
            raise ValueError("DataConfig needs at least one dataset")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"num_workers and shuffle_buffer must be >= 0, got {self.num_workers}, {self.shuffle_buffer}"
            )
        if self.tile_budget not in (None, *TILE_BUDGETS) or (self.max_image_tiles or 1) < 1:
            raise ValueError(
                f"tile_budget must be one of {TILE_BUDGETS} and max_image_tiles >= 1, got "
                f"{self.tile_budget!r}, {self.max_image_tiles}"
            )

