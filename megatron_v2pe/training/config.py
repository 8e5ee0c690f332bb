"""The training configuration: typed sections read from YAML, with dotted ``key=value`` overrides.

Knob names follow Megatron-LM (``tensor_model_parallel_size``, ``global_batch_size``, ``train_iters``,
``lr_warmup_fraction``, ``save_interval`` …) so that a Megatron user finds them where they expect.
``validate`` checks everything that can be checked before any process group, model or data exists,
and says what to change; a bad configuration must not cost a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_v2pe.data.packing import padding_multiple
from megatron_v2pe.data.source import expand_urls
from megatron_v2pe.parallel.fp8 import FP8_RECIPES, fp8_transformer_overrides


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change."""


@dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | internvl2_2b (model/presets.py)
    hf_config: str | None = None  # an InternVL2 config.json (or its directory); replaces the preset
    vocab_size: int | None = None  # tiny only; default: the tokenizer's
    img_context_token_id: int | None = None  # tiny only; default: the tokenizer's <IMG_CONTEXT>
    vision_drop_path_rate: float | None = None  # InternViT stochastic depth; None keeps the preset's
    rotary_base: float | None = None  # the language model's RoPE base; None keeps the preset's (1e6)
    attention_backend: str = "auto"  # auto | te | torch | reference
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    recompute_granularity: str | None = None  # None | full | selective (activation checkpointing)
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


@dataclass
class DatasetEntry:
    shards: str  # shard patterns, a directory or a manifest.json (data/source.py: expand_urls)
    weight: float = 1.0


@dataclass
class DataSection:
    datasets: list[DatasetEntry] = field(default_factory=list)
    tokenizer: str | None = None
    max_seq_len: int = 32768  # tokens per pack (after padding)
    max_tiles: int = 128  # tiles per pack
    max_image_tiles: int | None = None  # grid tiles per image (max_dynamic_patch); None: the model's
    tile_budget: str | None = None  # per_image (V2PE's recipe) | per_sample (InternVL's); None: the model's
    pad_multiple: int | None = None  # sub-sample padding; None: the layout's (packing.padding_multiple).
    # Fix it to the largest layout a run will move between, so that packs do not change on resharding.
    delta_policy: str = "random"  # none | fixed:<δ> | random | auto:<window>
    loss_weighting: str = "square"  # square (1/sqrt(n) per sub-sample, the paper's) | token
    over_long: str = "drop"  # drop | truncate
    pack_buffer_size: int = 32
    shuffle_buffer: int = 64
    num_workers: int = 2


@dataclass
class TrainingSection:
    train_iters: int = 100
    global_batch_size: int = 1  # packs per step, over all data-parallel ranks
    micro_batch_size: int = 1  # packs per micro-batch: always 1 (one THD pack)
    seed: int = 1234
    bf16: bool = False  # on a CPU-only host training runs in fp32
    fp8: str | None = None  # FP8 recipe: None | delayed | tensorwise | blockwise (TE on Hopper+)
    exit_signal_handler: bool = True  # SIGTERM / SIGUSR1: finish the step, save, exit 0


@dataclass
class OptimizerSection:
    optimizer: str = "adam"  # AdamW (decoupled weight decay), as Megatron-Core names it
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root
    lr_warmup_fraction: float | None = None  # of train_iters; else lr_warmup_iters
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointSection:
    save: str | None = None  # directory of iter_NNNNNNN checkpoints and the 'latest' marker
    save_interval: int | None = None  # also saved at the end and on SIGTERM / SIGUSR1
    load: str | None = None  # resume from here (default: save)
    pretrained_checkpoint: str | None = None  # model weights only (e.g. a converted HF model)
    keep_last: int | None = None  # delete older checkpoints; None keeps all
    async_save: bool = False
    optimizer_sharding: str = "fully_reshardable"  # fully_reshardable | dp_reshardable


@dataclass
class LoggingSection:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    metrics_file: str | None = None  # one JSON line per step (rank 0)
    progress_bar: bool | None = None  # None: on a CPU-only host
    peak_flops_per_gpu: float = 989e12  # MFU denominator: H100 SXM dense bf16


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_parallel_size(self) -> int:
        p = self.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def num_micro_batches(self, world_size: int) -> int:
        return self.training.global_batch_size // (
            self.training.micro_batch_size * self.data_parallel_size(world_size)
        )

    @property
    def layout_pad_multiple(self) -> int:
        """What this parallel layout needs every sub-sample padded to a multiple of."""
        p = self.parallel
        return padding_multiple(
            p.context_parallel_size,
            p.tensor_model_parallel_size,
            p.sequence_parallel,
            self.training.fp8 is not None,
        )

    @property
    def pad_multiple(self) -> int:
        return self.data.pad_multiple or self.layout_pad_multiple


# --------------------------------------------------------------------------------------------------
# Reading: YAML + overrides -> typed sections


def _merge(base: dict, path: Sequence[str], value: Any) -> None:
    node = base
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (ints are accepted for floats), or a ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _check_type(value, option, where)
                except ConfigError:
                    continue
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Any, where: str) -> Any:
    if isinstance(values, str) and cls is DatasetEntry:
        values = {"shards": values}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
            f"{where or 'the config'} takes {', '.join(sorted(hints))}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file (if any) with ``section.key=value`` overrides applied (values parsed as YAML)."""
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write section.key=value, e.g. training.train_iters=10")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
        _merge(raw, key.split("."), value)
    return _build(TrainConfig, raw, "")


# --------------------------------------------------------------------------------------------------
# Validation: before any work


_CHOICES = {
    "model.attention_backend": ("auto", "te", "torch", "reference"),
    "model.recompute_granularity": (None, "full", "selective"),
    "model.recompute_method": ("uniform", "block"),
    "data.loss_weighting": ("square", "token"),
    "data.over_long": ("drop", "truncate"),
    "data.tile_budget": (None, "per_image", "per_sample"),
    "training.fp8": (None, *FP8_RECIPES),
    "optimizer.optimizer": ("adam",),
    "optimizer.lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root"),
    "checkpoint.optimizer_sharding": ("fully_reshardable", "dp_reshardable"),
}


def _get(config: TrainConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def validate(config: TrainConfig, world_size: int) -> None:
    """Raise ConfigError with what to change if ``config`` cannot run on ``world_size`` processes."""
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"{key} is {_get(config, key)!r}; choose one of {choices}")
    if config.model.rotary_base is not None and not config.model.rotary_base > 1:
        raise ConfigError(f"model.rotary_base is {config.model.rotary_base}; it must be > 1 (InternLM2: 1e6)")
    _validate_parallel(config, world_size)
    _validate_precision(config)
    _validate_data(config)
    _validate_schedule(config)


def _validate_parallel(config: TrainConfig, world_size: int) -> None:
    p, t = config.parallel, config.training
    sizes = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    if min(sizes) < 1:
        raise ConfigError(f"parallel sizes must be >= 1, got TP, PP, CP = {sizes}")
    if world_size % config.model_parallel_size:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
            f"{config.model_parallel_size}; change the parallel sizes or launch a multiple of "
            f"{config.model_parallel_size} processes"
        )
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1; set it to false")
    if p.virtual_pipeline_model_parallel_size is not None and (
        p.pipeline_model_parallel_size < 2 or p.virtual_pipeline_model_parallel_size < 2
    ):
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2 and a "
            "value >= 2; unset it (null) otherwise"
        )
    if t.micro_batch_size != 1:
        raise ConfigError(
            f"training.micro_batch_size is {t.micro_batch_size}: a micro-batch is one packed (THD) "
            "sequence; set it to 1 and raise data.max_seq_len or global_batch_size instead"
        )
    dp = config.data_parallel_size(world_size)
    if t.global_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size {t.global_batch_size} is not a positive multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; make it a multiple "
            f"of {t.micro_batch_size * dp}"
        )
    if (
        p.virtual_pipeline_model_parallel_size
        and config.num_micro_batches(world_size) % p.pipeline_model_parallel_size
    ):
        raise ConfigError(
            f"the interleaved pipeline needs micro-batches per step ({config.num_micro_batches(world_size)}) "
            f"to be a multiple of pipeline_model_parallel_size {p.pipeline_model_parallel_size}; change "
            "training.global_batch_size"
        )


def _validate_precision(config: TrainConfig) -> None:
    if config.training.fp8 is None:
        return
    try:
        fp8_transformer_overrides(config.training.fp8)
    except (ImportError, RuntimeError) as err:
        raise ConfigError(f"training.fp8={config.training.fp8}: {err}; or set training.fp8 to null") from err
    if not config.training.bf16:
        raise ConfigError("training.fp8 runs on top of bf16; set training.bf16 to true")


def _validate_data(config: TrainConfig) -> None:
    d, p = config.data, config.parallel
    multiple = config.layout_pad_multiple
    if d.pad_multiple is not None and d.pad_multiple % multiple:
        raise ConfigError(
            f"data.pad_multiple {d.pad_multiple} is not a multiple of {multiple}, the padding "
            f"multiple of this layout; use a multiple of {multiple} or null"
        )
    multiple = config.pad_multiple
    if d.max_seq_len % multiple:
        raise ConfigError(
            f"data.max_seq_len {d.max_seq_len} is not a multiple of {multiple}, the padding multiple "
            f"(data.pad_multiple, or this layout's: 2 x context_parallel_size {p.context_parallel_size}"
            + (
                f" x tensor_model_parallel_size {p.tensor_model_parallel_size} (sequence parallel)"
                if p.sequence_parallel
                else ""
            )
            + (" x 8 (fp8)" if config.training.fp8 else "")
            + f"); use {d.max_seq_len // multiple * multiple or multiple}"
        )
    if d.tokenizer is None:
        raise ConfigError(
            "data.tokenizer is not set; give a sentencepiece .model file or a tokenizer directory"
        )
    if not os.path.exists(d.tokenizer):
        raise ConfigError(
            f"data.tokenizer {d.tokenizer} does not exist; give a sentencepiece .model file "
            "or a tokenizer directory (tools/synth_data.py --tokenizer makes a demo one)"
        )
    if not d.datasets:
        raise ConfigError("data.datasets is empty; list shard patterns, directories or manifest.json files")
    for i, dataset in enumerate(d.datasets):
        try:
            urls = expand_urls(dataset.shards)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.datasets[{i}].shards {dataset.shards!r}: {err}") from err
        missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u and not os.path.exists(u)]
        if not urls or missing:
            raise ConfigError(
                f"data.datasets[{i}].shards {dataset.shards!r} names no shard files"
                + (f" ({missing[0]} is missing)" if missing else "")
                + "; check the path (tools/synth_data.py writes demo shards)"
            )


def _validate_schedule(config: TrainConfig) -> None:
    t, o, c = config.training, config.optimizer, config.checkpoint
    if t.train_iters < 1:
        raise ConfigError(f"training.train_iters must be >= 1, got {t.train_iters}")
    if o.lr_warmup_fraction is not None and not 0 <= o.lr_warmup_fraction <= 1:
        raise ConfigError(f"optimizer.lr_warmup_fraction must be in [0, 1], got {o.lr_warmup_fraction}")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"need 0 <= optimizer.min_lr <= optimizer.lr, got {o.min_lr} and {o.lr}")
    if c.save_interval is not None and c.save_interval < 1:
        raise ConfigError(f"checkpoint.save_interval must be >= 1 or null, got {c.save_interval}")
    if c.keep_last is not None and c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1 or null, got {c.keep_last}")
    if config.logging.log_interval < 1:
        raise ConfigError(f"logging.log_interval must be >= 1, got {config.logging.log_interval}")
