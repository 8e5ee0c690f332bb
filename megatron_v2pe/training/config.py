"""The training configuration: typed sections read from YAML, with dotted ``key=value`` overrides.

Knob names follow Megatron-LM (``tensor_model_parallel_size``, ``global_batch_size``, ``train_iters``,
``lr_warmup_fraction``, ``save_interval`` …) so that a Megatron user finds them where they expect.
Each section is its component's own configuration dataclass (data/config.py, model/model_config.py,
parallel/config.py, training/optimizer.py, training/progress.py), read here with its types and
``Literal`` choices checked; TrainConfig composes them and checks what spans sections.
``validate`` checks everything that can be checked before any process group, model or data exists,
and says what to change; a bad configuration must not cost a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.conversation import chat_template, check_markers
from megatron_v2pe.data.loader import check_tokenizer_matches
from megatron_v2pe.data.packing import MAX_PACK_TOKENS, padding_multiple
from megatron_v2pe.data.probe import PACK_LIMITS, skips_before_first_fit
from megatron_v2pe.data.source import DatasetUnreadable, expand_urls
from megatron_v2pe.errors import UsageError
from megatron_v2pe.model.model_config import ModelConfig, vlm_config
from megatron_v2pe.model.presets import vision_attention_heads
from megatron_v2pe.parallel.attention_backends import resolve_attention_backend
from megatron_v2pe.parallel.config import ParallelConfig
from megatron_v2pe.parallel.fp8 import FP8Recipe, fp8_transformer_overrides
from megatron_v2pe.training.optimizer import OptimizerConfig
from megatron_v2pe.training.progress import LoggingConfig
from megatron_v2pe.v2pe.positions import parse_delta_policy

if TYPE_CHECKING:
    from megatron_v2pe.data.tokenizer import Tokenizer
    from megatron_v2pe.model.presets import VLMConfig

PROBE_SAMPLES = 16
"""Samples of each dataset read before training to see that the pack limits let some in."""


class ConfigError(UsageError):
    """A configuration that cannot run; the message says which key to change."""


@dataclass
class TrainingSection:
    train_iters: int = 100
    global_batch_size: int = 1  # packs per step, over all data-parallel ranks
    micro_batch_size: int = 1  # packs per micro-batch: always 1 (one THD pack)
    seed: int = 1234
    bf16: bool = False  # on a CPU-only host training runs in fp32
    fp8: FP8Recipe | None = None  # FP8 recipe (TE on Hopper+)
    exit_signal_handler: bool = True  # SIGTERM / SIGUSR1: finish the step, save, exit 0


@dataclass
class CheckpointSection:
    save: str | None = None  # directory of iter_NNNNNNN checkpoints and the 'latest' marker
    save_interval: int | None = None  # also saved at the end and on SIGTERM / SIGUSR1
    load: str | None = None  # resume from here (default: save)
    pretrained_checkpoint: str | None = None  # model weights only (e.g. a converted HF model)
    keep_last: int | None = None  # delete older checkpoints; None keeps all
    async_save: bool = False
    optimizer_sharding: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    override_opt_param_scheduler: bool = False  # on resume, the config's LR schedule, not the checkpoint's
    restart_data_stream: bool = False  # on resume, a fresh data stream if the saved one no longer fits


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as its YAML reads (what checkpoints and metrics record)."""
        return _as_yaml(self)

    @property
    def model_parallel_size(self) -> int:
        return self.parallel.model_parallel_size

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

    def data_config(self) -> DataConfig:
        """The data section with what it takes from the others: the seed and the padding multiple."""
        return dataclasses.replace(self.data, seed=self.training.seed, pad_multiple=self.pad_multiple)


# --------------------------------------------------------------------------------------------------
# Reading: YAML + overrides -> typed sections


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a YAML section takes: all but those marked ``metadata={"yaml": False}`` (set in code)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _as_yaml(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _as_yaml(getattr(value, f.name)) for f in _yaml_fields(type(value))}
    if isinstance(value, list | tuple):
        return [_as_yaml(v) for v in value]
    return value


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
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where} is {value!r}; choose one of {typing.get_args(hint)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if len(options) == 2 and type(None) in options:  # Optional[X]: X's own message
            return _check_type(value, next(o for o in options if o is not type(None)), where)
        for option in options:
            if option is not type(None):
                try:
                    return _check_type(value, option, where)
                except ConfigError:
                    continue
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if origin in (list, tuple):  # list[X] or tuple[X, ...]; YAML gives a list
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return origin(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
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
    if isinstance(values, str) and cls is DatasetSpec:
        values = {"shards": values}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    all_hints = typing.get_type_hints(cls)
    hints = {f.name: all_hints[f.name] for f in _yaml_fields(cls)}
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


def _where(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _read_yaml(path: Path) -> dict:
    """The sections of a YAML file; a missing file or bad syntax is named with its line."""
    if not path.is_file():
        raise ConfigError(f"the configuration file {path} does not exist; check the --config path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as err:
        started = f" ({err.context} started at {_where(err.context_mark)})" if err.context_mark else ""
        raise ConfigError(
            f"{path}, {_where(err.problem_mark)}: not valid YAML: {err.problem}{started}; "
            "fix the syntax there"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}); fix the syntax") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file (if any) with ``section.key=value`` overrides applied (values parsed as YAML)."""
    raw = _read_yaml(Path(path)) if path is not None else {}
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


_LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # key: (test of a set value, what the value must be); None (where allowed) always passes
    "model.vocab_size": (lambda v: v >= 1, ">= 1"),
    "model.img_context_token_id": (lambda v: v >= 0, ">= 0"),
    "model.vision_drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.rotary_base": (lambda v: v > 1, "> 1 (InternLM2: 1e6)"),
    "model.recompute_num_layers": (lambda v: v >= 1, ">= 1"),
    "model.loss_chunk_tokens": (lambda v: v >= 1, ">= 1 (tokens per chunk), or null for the full logits"),
    "data.max_seq_len": (lambda v: 1 <= v <= MAX_PACK_TOKENS, f"in [1, {MAX_PACK_TOKENS}] (tokens per pack)"),
    "data.max_tiles": (lambda v: v >= 1, ">= 1 (image tiles per pack)"),
    "data.max_image_tiles": (lambda v: v >= 1, ">= 1, or null for the model's"),
    "data.pad_multiple": (lambda v: v >= 1, ">= 1, or null for the layout's"),
    "data.pack_buffer_size": (lambda v: v >= 1, ">= 1"),
    "data.shuffle_buffer": (lambda v: v >= 0, ">= 0 (0: no shuffling)"),
    "data.num_workers": (lambda v: v >= 0, ">= 0 (0: read in the training process)"),
    "training.train_iters": (lambda v: v >= 1, ">= 1"),
    "optimizer.lr": (lambda v: v > 0, "> 0"),
    "optimizer.lr_warmup_fraction": (lambda v: 0 <= v <= 1, "in [0, 1], or null to use lr_warmup_iters"),
    "optimizer.lr_warmup_iters": (lambda v: v >= 0, ">= 0"),
    "optimizer.lr_warmup_init": (lambda v: v >= 0, ">= 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, ">= 0 (0: no weight decay)"),
    "optimizer.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1) (usually 0.9)"),
    "optimizer.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1) (usually 0.95 to 0.999)"),
    "optimizer.adam_eps": (lambda v: v > 0, "> 0 (usually 1e-8)"),
    "optimizer.clip_grad": (lambda v: v >= 0, ">= 0 (the gradient-norm bound; 0 turns clipping off)"),
    "checkpoint.save_interval": (lambda v: v >= 1, ">= 1, or null to save only at the end"),
    "checkpoint.keep_last": (lambda v: v >= 1, ">= 1, or null to keep every checkpoint"),
    "logging.log_interval": (lambda v: v >= 1, ">= 1"),
    "logging.peak_flops_per_gpu": (lambda v: v > 0, "> 0"),
}


def _get(config: TrainConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def validate(config: TrainConfig, world_size: int) -> None:
    """Raise ConfigError with what to change if ``config`` cannot run on ``world_size`` processes."""
    _build(TrainConfig, config.to_dict(), "")  # types and choices, also of a config built in code
    for key, (test, requirement) in _LIMITS.items():
        value = _get(config, key)
        if value is not None and not test(value):
            raise ConfigError(f"{key} is {value!r}; it must be {requirement}")
    for key in ("model.hf_config", "checkpoint.pretrained_checkpoint"):
        path = _get(config, key)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"{key} {path} does not exist; check the path or set it to null")
    _validate_parallel(config, world_size)
    _validate_recompute(config)
    _validate_host(config)
    _validate_data(config)
    _validate_schedule(config)


def _validate_parallel(config: TrainConfig, world_size: int) -> None:
    p, t = config.parallel, config.training
    sizes = p.model_parallel_sizes
    if min(sizes) < 1:
        raise ConfigError(f"parallel sizes must be >= 1, got TP, PP, CP = {sizes}")
    try:
        p.check_world_size(world_size)
    except UsageError as err:
        raise ConfigError(str(err)) from err
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


def _validate_recompute(config: TrainConfig) -> None:
    m = config.model
    if m.recompute_modules is not None and m.recompute_granularity != "selective":
        raise ConfigError("model.recompute_modules applies to recompute_granularity: selective; set it "
                          "or remove recompute_modules")
    if "layernorm" in (m.recompute_modules or ()) and m.attention_backend != "te":
        raise ConfigError("model.recompute_modules 'layernorm' needs the Transformer Engine layers "
                          "(Megatron-Core checkpoints norms through TE); set attention_backend: te or "
                          "drop it")


def _validate_host(config: TrainConfig) -> None:
    """What this machine must provide: the attention kernels and FP8 support asked for."""
    backend = config.model.attention_backend
    try:
        resolve_attention_backend(backend)
    except ImportError as err:
        raise ConfigError(
            f"model.attention_backend={backend}: {str(err).rstrip('.')}; or set model.attention_backend "
            "to auto"
        ) from err
    if config.training.fp8 is None:
        return
    try:
        fp8_transformer_overrides(config.training.fp8)
    except (ImportError, RuntimeError) as err:
        raise ConfigError(
            f"training.fp8={config.training.fp8}: {str(err).rstrip('.')}; or set training.fp8 to null"
        ) from err
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
    try:
        parse_delta_policy(d.delta_policy)
    except ValueError as err:
        raise ConfigError(f"data.delta_policy: {err}") from err
    _validate_datasets(d.datasets)


def _validate_datasets(datasets: list[DatasetSpec]) -> None:
    if not datasets:
        raise ConfigError("data.datasets is empty; list shard patterns, directories or manifest.json files")
    for i, dataset in enumerate(datasets):
        if not dataset.weight > 0:
            raise ConfigError(
                f"data.datasets[{i}].weight is {dataset.weight}; weights must be > 0 (their share of the "
                "mix); remove the dataset to leave it out"
            )
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
    o = config.optimizer
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"need 0 <= optimizer.min_lr <= optimizer.lr, got {o.min_lr} and {o.lr}")


def model_config(config: TrainConfig, tokenizer: Tokenizer) -> VLMConfig:
    """The model section's architecture for this tokenizer; ValueError if the two do not match or the
    chat template is not implemented (before any data is read)."""
    vlm = vlm_config(config.model, tokenizer.vocab_size, tokenizer.img_context_id)
    check_tokenizer_matches(tokenizer, vlm)
    check_markers(chat_template(vlm.template), tokenizer)
    return vlm


def validate_architecture(config: TrainConfig, vlm: VLMConfig) -> None:
    """Raise ConfigError if the model does not split over the parallel layout the way Megatron-Core
    requires (it would assert on every rank, after the process groups are up)."""
    p = config.parallel
    tp = p.tensor_model_parallel_size
    stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    lm, vit = vlm.language, vlm.vision
    tp_name, stages_name = "tensor_model_parallel_size", "pipeline stages (pipeline x virtual pipeline size)"
    _check_divisible(vlm, [  # (what, size, divisor, name of the divisor)
        ("language model attention heads", lm.num_attention_heads, tp, tp_name),
        ("language model query groups", lm.num_query_groups, tp, tp_name),
        ("language model FFN hidden size", lm.ffn_hidden_size, tp, tp_name),
        ("language model hidden size (the projector's width)", lm.hidden_size, tp, tp_name),
    ])  # the vocabulary is padded to a multiple of TP (model/tp_padding.py)
    try:
        vision_attention_heads(vit, tp)  # refuses what it cannot pad (InternViT-6B pads to a multiple of TP)
    except ValueError as err:
        raise ConfigError(f"model {vlm.name}: {err}") from None
    _check_divisible(vlm, [
        ("vision FFN hidden size", vit.ffn_hidden_size, tp, tp_name),
        ("language model layers", lm.num_layers, stages, stages_name),
    ])


def _check_divisible(vlm: VLMConfig, rules: list[tuple[str, int, int, str]]) -> None:
    for what, size, divisor, name in rules:
        if size % divisor:
            raise ConfigError(
                f"model {vlm.name}: {what} = {size} is not divisible by {name} {divisor}; "
                f"choose {name} dividing {size}"
            )


def validate_samples(config: TrainConfig, data: DataConfig, vlm: VLMConfig, tokenizer: Tokenizer) -> None:
    """Raise ConfigError when none of the first samples of a dataset fits a pack of data.max_seq_len
    tokens and data.max_tiles tiles: training would skip them all, after building the model."""
    d = config.data
    for i, entry in enumerate(d.datasets):
        try:
            skipped = skips_before_first_fit(data, vlm, tokenizer, i, PROBE_SAMPLES)
        except DatasetUnreadable as err:
            raise ConfigError(f"data.datasets[{i}] ({entry.shards}): {err}") from err
        if skipped and any(reason in skipped for reason in PACK_LIMITS):
            raise ConfigError(
                f"none of the first {sum(skipped.values())} samples of data.datasets[{i}] "
                f"({entry.shards}) fits a pack of data.max_seq_len {d.max_seq_len} tokens and "
                f"data.max_tiles {d.max_tiles} tiles (skipped: "
                + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
                + "); raise data.max_seq_len or data.max_tiles"
                + (", or set data.over_long to truncate" if d.over_long == "drop" else "")
            )
