"""The machinery behind the conversion tables: one rule per tensor family, read in both directions.

A table (one per Hugging Face layout) is a list of ``Rule``s. Each rule names the Hugging Face tensor(s),
the Megatron tensor they become, the reversible ``Transform`` between them, and how Megatron splits that
tensor across tensor-parallel ranks. Patterns holding ``{layer}`` repeat over the layers of the part
(``vision`` or ``language``) the rule belongs to. Loaders, exporters and the checks read the same rules, so
the two directions cannot drift apart.

Megatron names are those of ``InternVLModel.state_dict()`` at tensor-parallel size 1 (whole tensors);
dist checkpoints reshard them to any layout.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from megatron_v2pe.model.tp_padding import padded_size
from megatron_v2pe.model.presets import VLMConfig


class TPSplit(enum.Enum):
    """How Megatron splits a tensor across tensor-parallel ranks (``partition_dim`` of the parameter)."""

    REPLICATED = None
    COLUMN = 0  # output features: column-parallel linears, vocab-parallel embedding and output layer
    ROW = 1  # input features: row-parallel linears
    GATED_COLUMN = "gated"  # [gate; up] stacked: each rank holds its rows of gate and of up

    def shard(self, tensor: Tensor, rank: int, size: int) -> Tensor:
        """This rank's piece of the whole (tensor-parallel size 1) tensor."""
        if self is TPSplit.REPLICATED or size == 1:
            return tensor
        if self is TPSplit.GATED_COLUMN:
            return torch.cat([half.chunk(size, 0)[rank] for half in tensor.chunk(2, 0)])
        return tensor.chunk(size, self.value)[rank]

    def whole_shape(self, local: torch.Size, size: int) -> torch.Size:
        """The tensor-parallel-1 shape of a parameter whose local piece is ``local``."""
        if self is TPSplit.REPLICATED:
            return local
        dim = 0 if self is TPSplit.GATED_COLUMN else self.value
        return torch.Size((*local[:dim], local[dim] * size, *local[dim + 1 :]))


@dataclass(frozen=True)
class Padded:
    """A column or row split of a tensor holding ``units`` equal slices side by side along the split
    dimension (attention heads, vocabulary rows), where each rank's piece is that of the tensor padded
    with zero units up to a multiple of the TP size (InternViT-6B's 25 heads or InternVL3-78B's 151,674
    vocabulary rows at TP 8: ``model/tp_padding.py``)."""

    split: TPSplit
    units: int

    @property
    def value(self) -> int:
        return self.split.value

    def shard(self, tensor: Tensor, rank: int, size: int) -> Tensor:
        width = tensor.shape[self.value] // self.units
        padding = list(tensor.shape)
        padding[self.value] = (padded_size(self.units, size) - self.units) * width
        padded = torch.cat([tensor, tensor.new_zeros(padding)], dim=self.value)
        return padded.chunk(size, self.value)[rank]

    def whole_shape(self, local: torch.Size, size: int) -> torch.Size:
        width = local[self.value] // (padded_size(self.units, size) // size)
        return torch.Size((*local[: self.value], self.units * width, *local[self.value + 1 :]))


Split = TPSplit | Padded


class Transform(Protocol):
    """A reversible map between the Hugging Face tensors of one rule and one Megatron tensor."""

    def to_megatron(self, hf: list[Tensor]) -> Tensor: ...

    def to_hf(self, megatron: Tensor) -> list[Tensor]: ...


@dataclass(frozen=True)
class Identity:
    def to_megatron(self, hf: list[Tensor]) -> Tensor:
        (tensor,) = hf
        return tensor

    def to_hf(self, megatron: Tensor) -> list[Tensor]:
        return [megatron]


@dataclass(frozen=True)
class Concat:
    """Several tensors stacked along dim 0, e.g. SwiGLU's [gate; up] in Megatron's ``linear_fc1``."""

    parts: int = 2

    def to_megatron(self, hf: list[Tensor]) -> Tensor:
        return torch.cat(hf, dim=0)

    def to_hf(self, megatron: Tensor) -> list[Tensor]:
        return [t.clone() for t in megatron.chunk(self.parts, dim=0)]


@dataclass(frozen=True)
class SeparateQKV:
    """Separate q, k, v projections (weights or biases) <-> Megatron's fused ``linear_qkv``, laid out per
    query group as [q of heads/groups heads | k | v], so that a tensor-parallel rank holds whole groups."""

    heads: int
    groups: int
    head_dim: int

    def to_megatron(self, hf: list[Tensor]) -> Tensor:
        q, k, v = hf
        rest = q.shape[1:]
        q = q.reshape(self.groups, self.heads // self.groups * self.head_dim, *rest)
        k = k.reshape(self.groups, self.head_dim, *rest)
        v = v.reshape(self.groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, megatron: Tensor) -> list[Tensor]:
        rest = megatron.shape[1:]
        per_group = megatron.reshape(self.groups, -1, *rest)
        q_size = self.heads // self.groups * self.head_dim
        q, k, v = per_group.split([q_size, self.head_dim, self.head_dim], dim=1)
        return [t.reshape(-1, *rest).clone() for t in (q, k, v)]


@dataclass(frozen=True)
class StackedQKV:
    """One fused projection laid out [q | k | v] (each heads x head_dim; InternViT's ``attn.qkv``) <->
    Megatron's per-head [q | k | v] (multi-head attention: one group per head)."""

    heads: int
    head_dim: int

    def to_megatron(self, hf: list[Tensor]) -> Tensor:
        (qkv,) = hf
        rest = qkv.shape[1:]
        return (
            qkv.reshape(3, self.heads, self.head_dim, *rest).transpose(0, 1).reshape(-1, *rest).contiguous()
        )

    def to_hf(self, megatron: Tensor) -> list[Tensor]:
        rest = megatron.shape[1:]
        grouped = megatron.reshape(self.heads, 3, self.head_dim, *rest)
        return [grouped.transpose(0, 1).reshape(-1, *rest).contiguous()]


IDENTITY = Identity()
Part = Literal["vision", "language"]


@dataclass(frozen=True)
class Rule:
    """Hugging Face name pattern(s) <-> one Megatron name pattern, with the transform and TP split."""

    hf: tuple[str, ...]
    megatron: str
    transform: Transform = IDENTITY
    split: Split = TPSplit.REPLICATED
    per_layer: Part | None = None  # the patterns hold {layer}, repeated over this part's layers

    def __post_init__(self) -> None:
        templated = ["{layer}" in p for p in (*self.hf, self.megatron)]
        if any(templated) != (self.per_layer is not None) or any(templated) != all(templated):
            raise ValueError(f"rule {self.megatron!r}: {{layer}} must appear in every pattern iff per_layer")


def rule(
    hf: str | tuple[str, ...],
    megatron: str,
    transform: Transform = IDENTITY,
    split: Split = TPSplit.REPLICATED,
) -> Rule:
    return Rule(hf if isinstance(hf, tuple) else (hf,), megatron, transform, split)


def layer_rules(part: Part, hf_prefix: str, megatron_prefix: str, rules: Iterable[Rule]) -> list[Rule]:
    """The rules of one transformer layer, under ``<prefix>.{layer}.`` on both sides."""
    return [
        Rule(
            tuple(f"{hf_prefix}.{{layer}}.{p}" for p in r.hf),
            f"{megatron_prefix}.{{layer}}.{r.megatron}",
            r.transform,
            r.split,
            part,
        )
        for r in rules
    ]


@dataclass(frozen=True)
class Entry:
    """One rule made concrete for one layer."""

    hf: tuple[str, ...]
    megatron: str
    transform: Transform
    split: Split
    layer: int | None = field(default=None, compare=False)


def expand(rules: Iterable[Rule], config: VLMConfig) -> list[Entry]:
    """Concrete entries in Megatron order: non-layer tensors first, then layer by layer (streaming order)."""
    counts = {"vision": config.vision.num_layers, "language": config.language.num_layers}
    entries = []
    for r in rules:
        layers = [None] if r.per_layer is None else range(counts[r.per_layer])
        for i in layers:
            fill = (lambda p: p) if i is None else (lambda p, i=i: p.format(layer=i))
            entries.append(Entry(tuple(fill(p) for p in r.hf), fill(r.megatron), r.transform, r.split, i))
    return entries


def expected_hf_shapes(
    entries: Iterable[Entry], megatron_shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Size]:
    """The Hugging Face name -> shape each entry needs, derived from the Megatron shapes by running the
    transforms on meta tensors (no memory)."""
    shapes = {}
    for e in entries:
        meta = torch.empty(megatron_shapes[e.megatron], device="meta")
        shapes.update((name, t.shape) for name, t in zip(e.hf, e.transform.to_hf(meta), strict=True))
    return shapes


def to_megatron(entries: Iterable[Entry], read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Megatron tensors one by one, reading each Hugging Face tensor only when its entry is reached."""
    for e in entries:
        yield e.megatron, e.transform.to_megatron([read(name) for name in e.hf])


def to_hf(entries: Iterable[Entry], read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Hugging Face tensors one by one, in table order."""
    for e in entries:
        yield from zip(e.hf, e.transform.to_hf(read(e.megatron)), strict=True)
