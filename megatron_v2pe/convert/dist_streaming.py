"""Megatron dist checkpoints (``torch_dist``) written and read one tensor at a time.

Writing: Megatron's own ``torch_dist`` writer resolves every tensor of the save plan into its write buckets
before it writes the first byte, so the whole model would be resident. ``StreamingSaveStrategy`` keeps the
format (the same PyTorch Distributed ``.metadata``, ``.distcp`` files, ``common_state`` object and
``metadata.json``, written through ``dist_checkpointing.save``) but plans on a meta-device model and
hands PyTorch's ``FileSystemWriter`` each tensor only when that tensor is written: ``produce(name)`` builds
it then and it is dropped right after. Peak memory: one produced tensor (plus the Hugging Face tensors it is
made from).

Reading: ``load_group`` loads a chosen set of tensors (e.g. one layer's): Megatron's sharded state dict
restricted to them, read through PyTorch Distributed's ``FileSystemReader``; only their bytes are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


def _storage(tensor: torch.Tensor) -> int:
    """Identifies a tensor's storage (meta tensors have no data pointer)."""
    return tensor.untyped_storage()._cdata


class _ProducingPlanner(MCoreSavePlanner):
    """Resolves each tensor write item by producing the tensor it views, instead of reading a model."""

    def __init__(self, placeholders: Mapping[str, torch.Tensor], produce: Callable[[str], torch.Tensor]):
        super().__init__(
            dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False
        )
        self._placeholders, self._produce = placeholders, produce
        # the pieces Megatron saves are views of the parameters: their storage names the parameter
        self._names = {_storage(t): name for name, t in placeholders.items()}
        self._last: tuple[str, torch.Tensor] | None = None  # a tensor saved in pieces is produced once

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        placeholder = self.lookup_object(write_item.index)  # a meta-device view of one parameter
        name = self._names[_storage(placeholder)]
        root = self._placeholders[name]
        if self._last is None or self._last[0] != name:
            if self._last is not None:
                # the writer has written the previous tensor but still holds it while asking for this one:
                # free its memory now, or two tensors (e.g. both embeddings) would be resident at once
                self._last[1].untyped_storage().resize_(0)
                self._last = None
            tensor = self._produce(name).contiguous()
            if tensor.shape != root.shape or tensor.dtype != root.dtype:
                raise RuntimeError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(root.shape)} {root.dtype}"
                )
            self._last = (name, tensor)
        tensor = self._last[1]
        return tensor.as_strided(placeholder.size(), placeholder.stride(), placeholder.storage_offset())


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """``torch_dist`` saving whose tensors come from ``produce(name)`` one at a time (see module docstring).

    ``placeholders`` maps each name to the meta-device tensor the sharded state dict was built from."""

    def __init__(self, placeholders: Mapping[str, torch.Tensor], produce: Callable[[str], torch.Tensor]):
        super().__init__("torch_dist", 1)
        self._placeholders, self._produce = placeholders, produce

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
        dcp_save(
            mcore_to_pyt_state_dict(sharded_state_dict, False),
            storage_writer=writer,
            planner=_ProducingPlanner(self._placeholders, self._produce),
        )

    def async_save(self, *args, **kwargs):
        raise NotImplementedError("streaming saves are synchronous")


def save_streaming(
    sharded_state_dict: dict,
    directory: Path,
    placeholders: Mapping[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
) -> None:
    """``dist_checkpointing.save`` of a sharded state dict built on the meta device, filled by ``produce``."""
    dist_checkpointing.save(
        sharded_state_dict, str(directory), sharded_strategy=StreamingSaveStrategy(placeholders, produce)
    )


class _IntoBuffers:
    """The part of a load planner that PyTorch's ``FileSystemReader.read_data`` calls: where each read
    tensor region goes."""

    def __init__(self, buffers: Mapping[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.buffers = buffers

    def resolve_tensor(self, request: ReadItem) -> torch.Tensor:
        buffer = self.buffers[(request.dest_index.fqn, tuple(request.dest_index.offset))]
        return narrow_tensor_by_index(buffer, request.dest_offsets, request.lengths)

    def commit_tensor(self, request: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the buffer: the data is in place

    def load_bytes(self, request: ReadItem, value) -> None:
        raise RuntimeError(f"{request.dest_index.fqn}: expected a tensor")


def _read_pieces(directory: Path, pieces: Iterable[ShardedTensor]) -> None:
    """Fill the pieces' buffers from a ``torch_dist`` checkpoint: each piece is one region of a checkpoint
    tensor (Megatron's stacked layers: one layer), read from whichever chunks the writer produced.

    (Megatron's own loader turns the pieces into PyTorch sharded tensors that must cover the whole
    tensor, the rest placed on other ranks; a single process loading one layer has none.)"""
    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    items, buffers = [], {}
    for piece in pieces:
        if piece.key not in metadata.state_dict_metadata:
            raise KeyError(f"the checkpoint has no tensor {piece.key}")
        buffer = piece.data.view((1,) * piece.prepend_axis_num + tuple(piece.local_shape))
        chunk = ChunkStorageMetadata(torch.Size(piece.global_offset), buffer.shape)
        buffers[(piece.key, tuple(chunk.offsets))] = buffer
        items += create_read_items_for_chunk_list(piece.key, metadata.state_dict_metadata[piece.key], [chunk])
    reader.read_data(LoadPlan(items), _IntoBuffers(buffers)).wait()


def load_group(
    sharded_state_dict: Mapping[str, object],
    names: Iterable[str],
    directory: Path,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (keys of a meta-device model's sharded state dict) read from ``directory`` as
    ``dtype``; only their bytes are read, whatever TP/PP layout wrote the checkpoint."""
    subset = {}
    for name in names:
        item = sharded_state_dict[name]
        if not isinstance(item, ShardedTensor | ShardedTensorFactory):
            raise TypeError(f"{name} is not a tensor of the sharded state dict ({type(item).__name__})")
        subset[name] = dataclasses.replace(item, data=torch.empty(item.data.shape, dtype=dtype))
    factories, _ = extract_matching_values(
        subset, lambda x: isinstance(x, ShardedTensorFactory), return_lists_as_dicts=True
    )
    apply_factories(subset)  # e.g. [gate; up] becomes two pieces of one checkpoint tensor
    _read_pieces(directory, nested_values(subset))
    dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, subset)
    return dict(apply_factory_merges(subset, factories))
