"""Hugging Face checkpoint <-> Megatron-Core dist checkpoint, through the layout tables.

The Megatron side is a model-only checkpoint (``megatron_v2pe.checkpoint``, which owns its format): the
tensors of a tensor-parallel-1 model, stored whole and matched by key when loaded, so any TP/PP/CP layout
loads it, with ``vlm_config.json`` and ``tokenizer/`` beside them. Conversion streams in both directions
(``dist_streaming``): the model is built on the meta device for its sharding metadata only, and each
tensor is read, transformed and written on its own, so a model larger than the machine's memory converts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_v2pe.checkpoint.errors import UnloadableCheckpoint
from megatron_v2pe.checkpoint.model_config import tokenizer_dir, write_model_config
from megatron_v2pe.checkpoint.model_only import (
    build_model,
    model_checkpoint,
    saved_dtype,
    sharded_model_state,
)
from megatron_v2pe.convert.checks import ConversionError, tensor_problems
from megatron_v2pe.convert.dist_streaming import load_group, save_streaming
from megatron_v2pe.convert.hf_positions import V2PE_CONFIG_KEY
from megatron_v2pe.convert.layouts import LAYOUTS, Layout
from megatron_v2pe.convert.mapping import Entry, expand, expected_hf_shapes, to_hf, to_megatron
from megatron_v2pe.convert.safetensors_io import (
    SafetensorsSource,
    ShardedWriter,
    atomic_directory,
    copy_tokenizer_files,
    return_freed_memory,
)
from megatron_v2pe.errors import OutputExists
from megatron_v2pe.model.architecture import config_differences
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel.attention_backends import AttentionBackend
from megatron_v2pe.v2pe.positions import DELTA_CANDIDATES, parse_delta_policy


def weights(model: InternVLModel) -> dict[str, torch.Tensor]:
    """The model's tensors by Megatron name (without the ``_extra_state`` entries, which hold no weights)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def table(layout: Layout, config: VLMConfig) -> list[Entry]:
    return expand(layout.rules(config), config)


# -- Hugging Face -> model ---------------------------------------------------------------------------


def _checked_entries(
    params: dict[str, torch.Tensor], source: SafetensorsSource, layout: Layout, config: VLMConfig
) -> list[Entry]:
    """The table's entries, once the table covers every parameter and the Hugging Face checkpoint holds
    each tensor they name with the shape it needs (``params`` are this rank's pieces). Every missing,
    unexpected or mis-shaped tensor is reported in one ``ConversionError``."""
    entries = table(layout, config)
    uncovered = sorted(set(params) - {e.megatron for e in entries})
    if uncovered:
        raise RuntimeError(f"the {layout.name} table has no rule for {uncovered}")
    size = ps.get_tensor_model_parallel_world_size()
    whole = {e.megatron: e.split.whole_shape(params[e.megatron].shape, size) for e in entries}
    problems = tensor_problems(source.shapes(), expected_hf_shapes(entries, whole))
    if problems:
        raise ConversionError(str(source.directory), problems)
    return entries


def load_hf_weights(
    model: InternVLModel, source: SafetensorsSource, layout: Layout, config: VLMConfig
) -> None:
    """Stream a Hugging Face checkpoint into ``model`` (any tensor-parallel size; each rank keeps its
    piece by the table's split rule), after ``_checked_entries``: no weight changes unless all is there."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(
            "load Hugging Face weights at pipeline-parallel size 1, then reshard through a "
            "dist checkpoint (tools/convert_checkpoint.py writes one)"
        )
    params = weights(model)
    entries = _checked_entries(params, source, layout, config)
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    split = {e.megatron: e.split for e in entries}
    with torch.no_grad():
        for name, tensor in to_megatron(entries, source.read):
            params[name].copy_(split[name].shard(tensor, rank, size))


def read_hf_config(
    directory: str | Path, layout: Layout, img_context_token_id: int | None = None
) -> VLMConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(str(directory), [f"no config.json in {directory}"])
    try:
        return layout.read_config(json.loads(path.read_text()), img_context_token_id)
    except ValueError as err:
        raise ConversionError(str(directory), [str(err)]) from err


def _first_dtype(source: SafetensorsSource) -> torch.dtype:
    return source.dtype(next(iter(source.files)))


def hf_to_megatron(
    hf_dir: str | Path,
    output: str | Path,
    layout_name: str,
    *,
    expected: VLMConfig | None = None,
    dtype: torch.dtype | None = None,
    img_context_token_id: int | None = None,
    attention_backend: AttentionBackend = "auto",
) -> VLMConfig:
    """Convert a Hugging Face model directory into a model-only Megatron dist checkpoint at ``output``,
    one tensor at a time (each is read, transformed and written, then dropped; see ``dist_streaming``).

    ``expected`` (a preset) must match the checkpoint's config.json (every differing field is listed);
    ``dtype`` defaults to the checkpoint's. Returns the architecture. Nothing is written unless every
    check passes."""
    if Path(output).exists():
        raise OutputExists(f"{output} already exists; choose a new output directory")
    layout = LAYOUTS[layout_name]
    source = SafetensorsSource(hf_dir)
    config = read_hf_config(hf_dir, layout, img_context_token_id)
    differences = config_differences(config, expected) if expected is not None else []
    if differences:  # every tensor would mismatch too: the architecture is the problem to report
        raise ConversionError(str(hf_dir), differences)
    dtype = dtype or _first_dtype(source)
    return_freed_memory()
    if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("convert at tensor- and pipeline-parallel size 1: the dist checkpoint reshards")
    with torch.device("meta"):  # shapes and sharding metadata only: the weights are produced while saving
        model = build_model(config, dtype, attention_backend)
    placeholders = weights(model)
    entries = _checked_entries(placeholders, source, layout, config)
    by_name = {e.megatron: e for e in entries}

    def produce(name: str) -> torch.Tensor:
        ((_, tensor),) = to_megatron([by_name[name]], source.read)
        return tensor.to(dtype)

    with atomic_directory(output) as staging:
        save_streaming(sharded_model_state([model]), staging, placeholders, produce)
        write_model_config(config, staging)
        tokenizer_dir(staging).mkdir()
        copy_tokenizer_files(hf_dir, tokenizer_dir(staging))
    return config


# -- model -> Hugging Face ---------------------------------------------------------------------------


def v2pe_settings(config: VLMConfig, delta_policy: str, trained_window: int) -> dict[str, Any]:
    """What an exported model records about V2PE (read back by ``hf_positions``); plain ``auto`` is
    ``auto:<trained_window>``."""
    return {
        "delta_policy": parse_delta_policy(delta_policy, default_window=trained_window).spec,
        "delta_candidates": list(DELTA_CANDIDATES),
        "trained_window": trained_window,
        "tokens_per_tile": config.tokens_per_tile,
        "img_context_token_id": config.img_context_token_id,
    }


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor] | tuple[None, int]],
    dtype: torch.dtype,
    config: VLMConfig,
    output: str | Path,
    layout_name: str,
    *,
    v2pe: dict[str, Any],
    reference: str | Path | None = None,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """A Hugging Face model directory from ``tensors`` (Hugging Face name, tensor), consumed lazily: each
    shard is written when full, so one shard is held at a time. ``(None, bytes)`` announces that many
    bytes of tensors to come (see ``ShardedWriter.make_room``)."""
    layout = LAYOUTS[layout_name]
    reference_config = json.loads((Path(reference) / "config.json").read_text()) if reference else None
    try:
        hf_config = layout.write_config(config, reference_config)
    except ValueError as err:
        raise ConversionError(str(output), [str(err)]) from err
    hf_config[V2PE_CONFIG_KEY] = v2pe
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_directory(output) as staging:
        writer = ShardedWriter(staging, max_shard_bytes)
        for name, tensor in tensors:
            if name is None:
                writer.make_room(tensor)
            else:
                writer.add(name, tensor)
        writer.close()
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for extra in (reference, tokenizer):
            if extra is not None:
                copy_tokenizer_files(extra, staging)
        if reference is not None:
            for pattern in layout.reference_files:
                for path in Path(reference).glob(pattern):
                    (staging / path.name).write_bytes(path.read_bytes())


def layer_groups(entries: Iterable[Entry]) -> list[list[Entry]]:
    """The entries regrouped for streaming: each non-layer tensor alone, then one layer (of the vision
    model, then of the language model) at a time."""
    entries = list(entries)
    single = [[e] for e in entries if e.layer is None]
    part = lambda e: e.megatron.split(".layers.", 1)[0]
    layered = sorted((e for e in entries if e.layer is not None), key=lambda e: (part(e), e.layer))
    return single + [list(g) for _, g in itertools.groupby(layered, key=lambda e: (part(e), e.layer))]


def stream_megatron_to_hf(
    directory: Path, config: VLMConfig, layout: Layout, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face tensors of a dist checkpoint, reading one layer's tensors at a time. Before each
    layer (or non-layer tensor), ``(None, bytes)`` announces its size, so that a full shard is written out
    before the layer is read rather than after: one shard and one layer are resident, not two of either."""
    with torch.device("meta"):
        sharded = build_model(config, dtype).sharded_state_dict()
    for group in layer_groups(table(layout, config)):
        size = sum(sharded[e.megatron].data.numel() for e in group) * dtype.itemsize
        yield None, size  # announce the group: the writer flushes first if the shard cannot take it
        try:
            loaded = load_group(sharded, [e.megatron for e in group], directory, dtype)
        except Exception as err:  # Megatron's errors name the missing / mismatched tensors
            raise ConversionError(str(directory), [f"{type(err).__name__}: {err}"]) from err
        yield from to_hf(group, loaded.pop)  # each Megatron tensor is dropped once converted


def _checkpoint_problems(directory: Path, config: VLMConfig, dtype: torch.dtype) -> list[str]:
    """Tensors the architecture needs that the checkpoint lacks or holds with another shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    with torch.device("meta"):
        sharded = build_model(config, dtype).sharded_state_dict()
    problems = []
    for item in sharded.values():
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in stored:
            problems.append(f"missing tensor {item.key} (shape {tuple(item.global_shape)})")
        elif tuple(stored[item.key].global_shape) != tuple(item.global_shape):
            problems.append(
                f"shape mismatch {item.key}: {tuple(stored[item.key].global_shape)} in the checkpoint, "
                f"{tuple(item.global_shape)} expected"
            )
    return sorted(set(problems))


@contextmanager
def _as_conversion_error() -> Iterator[None]:
    """A checkpoint that cannot be loaded, in the words of a conversion that wrote nothing."""
    try:
        yield
    except UnloadableCheckpoint as err:
        raise ConversionError(str(err.path), [err.problem]) from err


def megatron_to_hf(
    megatron_dir: str | Path,
    output: str | Path,
    layout_name: str,
    *,
    config: VLMConfig | None = None,
    dtype: torch.dtype | None = None,
    delta_policy: str | None = None,
    trained_window: int | None = None,
    reference: str | Path | None = None,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> VLMConfig:
    """Export a Megatron dist checkpoint (any TP/PP layout) to a Hugging Face directory. The V2PE
    settings default to the ``auto`` δ policy over the trained window (the language model's maximum
    sequence length unless given). Tokenizer files come from ``tokenizer``, else the checkpoint's
    ``tokenizer/``."""
    if Path(output).exists():
        raise OutputExists(f"{output} already exists; choose a new output directory")
    with _as_conversion_error():
        directory, config = model_checkpoint(megatron_dir, config)
        saved = saved_dtype(directory)
    window = trained_window or config.language.max_sequence_length
    try:
        v2pe = v2pe_settings(config, delta_policy or "auto", window)
    except ValueError as err:
        raise ConversionError(str(megatron_dir), [str(err)]) from err
    return_freed_memory()
    dtype = dtype or saved
    problems = _checkpoint_problems(directory, config, dtype)
    if problems:
        raise ConversionError(str(directory), problems)
    bundled = tokenizer_dir(megatron_dir)
    layout = LAYOUTS[layout_name]
    write_hf(
        stream_megatron_to_hf(directory, config, layout, dtype),
        dtype,
        config,
        output,
        layout_name,
        v2pe=v2pe,
        reference=reference,
        tokenizer=tokenizer or (bundled if bundled.is_dir() else None),
        max_shard_bytes=max_shard_bytes,
    )
    return config
