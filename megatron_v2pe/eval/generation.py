"""Greedy or sampled decoding of an InternVLModel with V2PE positions, for batches of prompts.

Prompt positions come from a δ policy (text +1, visual +δ): ``auto:<window>`` by default, ``fixed:<δ>`` or
``none``; the k-th generated token of a prompt sits at (its last prompt position) + k. With ``use_cache``
the prompts are prefilled ``prefill_chunk`` tokens at a time into a preallocated KV cache
(``eval/prefill.py``, ``eval/kv_cache.py``) and every step feeds one new token per prompt; without it
every step recomputes the whole sequences, which is the oracle the cache is tested against. Only the
logits of each sequence's last token are computed. Under context parallelism (a model built with it,
every rank of the group calling with the same arguments) the cache is sharded over the ranks and every
rank returns the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
from torch import Tensor

from megatron_v2pe.eval.decode_step import DecodeStep
from megatron_v2pe.eval.kv_cache import kv_cache, rank_capacity
from megatron_v2pe.eval.memory_plan import checked_plan
from megatron_v2pe.eval.prefill import PackedPrompts, logits_at, packed_params, prefill
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.v2pe.positions import AutoDelta, DeltaPolicy, compute_positions, parse_delta_policy


DEFAULT_PREFILL_CHUNK = 8192
"""Prompt tokens per forward of the prefill, unless told otherwise."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: token ids with every image already expanded to its `<IMG_CONTEXT>` slots, and the
    image tiles [n, 3, S, S] that fill them in order (None for text only)."""

    tokens: Sequence[int]
    pixel_values: Tensor | None = None


@dataclass(frozen=True)
class Generation:
    """What ``generate`` returns, one entry per prompt (tokens stop after the first stop token).

    ``positions`` are the V2PE positions of the generated tokens and ``deltas`` the δ of each image of the
    prompt; ``step_logits`` [steps, prompts, vocab] are the raw logits each token was chosen from, kept
    only when asked for."""

    tokens: list[list[int]]
    positions: list[np.ndarray]
    deltas: list[np.ndarray]
    step_logits: Tensor | None = None


@dataclass(frozen=True)
class Sampling:
    """Decoding rule: greedy when ``temperature`` is 0, else sampling from softmax(logits / T),
    restricted to the ``top_k`` most likely tokens when set, drawn from a seeded generator so runs repeat."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def resolve_delta_policy(model: InternVLModel, policy: DeltaPolicy | str | None) -> DeltaPolicy:
    """A policy object from a spec string; None means ``auto`` with the model's maximum sequence length
    as the window (pass ``auto:<n>`` when the model was trained on a shorter context)."""
    if policy is None:
        return AutoDelta(model.vlm_config.language.max_sequence_length)
    return parse_delta_policy(policy) if isinstance(policy, str) else policy


def prompt_positions(
    model: InternVLModel, prompts: Sequence[Prompt], policy: DeltaPolicy, reserve: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(positions, deltas) of each prompt. δ is chosen as if each prompt were followed by ``reserve`` text
    tokens, so that ``auto`` keeps the generated tokens inside the window too."""
    image_id = model.vlm_config.img_context_token_id
    masks = [np.asarray(p.tokens) == image_id for p in prompts]
    reserved = [np.append(m, np.zeros(reserve, dtype=bool)) for m in masks]
    cu = np.concatenate([[0], np.cumsum([m.size for m in reserved])])
    deltas = policy.deltas(np.concatenate(reserved), cu)
    per_prompt = np.split(deltas, np.cumsum([_num_runs(m) for m in masks])[:-1])
    return [compute_positions(m, d) for m, d in zip(masks, per_prompt)], per_prompt


def _num_runs(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask & ~np.concatenate(([False], mask[:-1]))))


def _check(model: InternVLModel, prompts: Sequence[Prompt], max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if any(len(p.tokens) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("generation needs the whole model on one pipeline stage")
    if model.training:
        raise ValueError("generation is for inference: call model.eval() first")


class _Chooser:
    """Picks the next token of every sequence; `<IMG_CONTEXT>` is never chosen (it is an image slot,
    with no image features to fill it)."""

    def __init__(self, sampling: Sampling, banned: int, device: torch.device):
        self.sampling = sampling
        self.banned = banned
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: Tensor) -> Tensor:
        logits = logits.float().clone()
        logits[:, self.banned] = -torch.inf
        if self.sampling.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / self.sampling.temperature
        if self.sampling.top_k is not None:
            kth = logits.topk(min(self.sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)[:, 0]


def pack_prompts(prompts: Sequence[Prompt], positions: Sequence[np.ndarray]) -> PackedPrompts:
    """The prompts end to end, with their positions and image tiles."""
    tiles = [p.pixel_values for p in prompts if p.pixel_values is not None]
    return PackedPrompts(
        tokens=torch.tensor(np.concatenate([p.tokens for p in prompts]), dtype=torch.long),
        positions=torch.from_numpy(np.concatenate(positions)),
        lengths=[len(p.tokens) for p in prompts],
        tiles=torch.cat(tiles) if tiles else None,
    )


def check_prefill_chunk(chunk: int | None) -> int:
    """The number of prompt tokens per prefill forward (the default for None)."""
    chunk = DEFAULT_PREFILL_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 token, got {chunk}")
    return chunk


@torch.no_grad()
def generate(
    model: InternVLModel,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    *,
    delta_policy: DeltaPolicy | str | None = None,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    use_cache: bool = True,
    keep_logits: bool = False,
    prefill_chunk: int | None = None,
) -> Generation:
    """Continue every prompt by up to ``max_new_tokens`` tokens (fewer after a stop token, which is kept)."""
    _check(model, prompts, max_new_tokens)
    chunk = check_prefill_chunk(prefill_chunk)
    if not use_cache and model.config.context_parallel_size > 1:
        raise ValueError(
            "recomputation (use_cache=False) runs in one process; context parallelism needs the cache"
        )
    positions, deltas = prompt_positions(
        model, prompts, resolve_delta_policy(model, delta_policy), max_new_tokens
    )
    packed = pack_prompts(prompts, positions)
    step = (_CachedSteps(model, packed, chunk, max_new_tokens) if use_cache
            else _RecomputedSteps(model, packed))
    with step:
        return _decode(
            step, model, positions, deltas, max_new_tokens, sampling, set(stop_tokens), keep_logits
        )


def _decode(
    step: _CachedSteps | _RecomputedSteps,
    model: InternVLModel,
    positions: list[np.ndarray],
    deltas: list[np.ndarray],
    max_new_tokens: int,
    sampling: Sampling,
    stop: set[int],
    keep_logits: bool,
) -> Generation:
    """The decoding loop: choose, record, stop when every sequence has stopped, feed the new tokens."""
    device = next(model.parameters()).device
    choose = _Chooser(sampling, model.vlm_config.img_context_token_id, device)
    next_position = torch.tensor([p[-1] + 1 for p in positions], dtype=torch.float64)  # on the host
    done = torch.zeros(len(positions), dtype=torch.bool, device=device)
    tokens, all_logits = [], []
    logits = step.first()
    for k in range(max_new_tokens):
        all_logits.append(logits)
        chosen = choose(logits)
        tokens.append(torch.where(done, -1, chosen))
        done |= torch.tensor([int(t) in stop for t in chosen], device=device)
        if bool(done.all()) or k == max_new_tokens - 1:
            break
        logits = step.next(chosen, next_position + k)
    table = torch.stack(tokens, dim=1).tolist()  # [prompts, steps], -1 after a stop token
    kept = [[t for t in row if t >= 0] for row in table]
    return Generation(
        tokens=kept,
        positions=[p[-1] + 1 + np.arange(len(row), dtype=np.float64) for p, row in zip(positions, kept)],
        deltas=deltas,
        step_logits=torch.stack(all_logits) if keep_logits else None,
    )


class _CachedSteps:
    """Chunked prefill once, then one new token per sequence per step through the KV cache
    (``next``: a ``DecodeStep``, a CUDA graph on a GPU)."""

    def __init__(self, model: InternVLModel, prompts: PackedPrompts, chunk: int, max_new_tokens: int):
        self.model, self.prompts, self.chunk = model, prompts, chunk
        self.device = next(model.parameters()).device
        cp = model.config.context_parallel_size
        capacity = rank_capacity(max(prompts.lengths) + max_new_tokens, chunk, cp)
        checked_plan(model, len(prompts.lengths), capacity, min(chunk, sum(prompts.lengths)),
                     len(prompts.lengths), cp)
        self._context = kv_cache(model, len(prompts.lengths), capacity)

    def __enter__(self) -> Self:
        self.cache = self._context.__enter__()
        self.next = DecodeStep(self.model, self.cache, use_graph=True)
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def first(self) -> Tensor:
        return prefill(self.model, self.cache, self.prompts, self.chunk, self.prompts.ends)


class _RecomputedSteps:
    """Every step runs the prompts plus all tokens generated so far from scratch (no cache)."""

    def __init__(self, model: InternVLModel, prompts: PackedPrompts):
        self.model, self.prompts = model, prompts
        self.device = next(model.parameters()).device
        self.tokens: list[Tensor] = []
        self.positions: list[Tensor] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def first(self) -> Tensor:
        return self._run()

    def next(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.append(tokens.cpu())
        self.positions.append(positions)
        return self._run()

    def _run(self) -> Tensor:
        """Logits at the last token of every sequence, for prompts extended by the tokens so far."""
        cu = np.concatenate([[0], np.cumsum(self.prompts.lengths)])
        ids, pos = self.prompts.tokens, self.prompts.positions
        pieces_ids, pieces_pos = [], []
        for j in range(len(self.prompts.lengths)):
            pieces_ids += [ids[cu[j] : cu[j + 1]], *(t[j : j + 1] for t in self.tokens)]
            pieces_pos += [pos[cu[j] : cu[j + 1]], *(p[j : j + 1] for p in self.positions)]
        lengths = [n + len(self.tokens) for n in self.prompts.lengths]
        last = torch.tensor(np.cumsum(lengths) - 1, device=self.device)
        with logits_at(self.model, last):
            logits = self.model(
                input_ids=torch.cat(pieces_ids).to(self.device)[None],
                positions=torch.cat(pieces_pos).to(self.device)[None],
                pixel_values=None if self.prompts.tiles is None else self.prompts.tiles.to(self.device),
                packed_seq_params=packed_params(lengths, self.device),
            )
        return logits[0]
