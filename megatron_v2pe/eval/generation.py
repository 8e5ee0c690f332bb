"""Greedy or sampled decoding of an InternVLModel with V2PE positions, for batches of prompts.

The prompts run as one packed THD batch (each prompt one sub-sample, positions restarting at 0), so
prompts of different lengths need no padding. Prompt positions come from a δ policy (V2PE.md §1):
``auto:<window>`` by default, ``fixed:<δ>`` or ``none``; the k-th generated token of a prompt sits at
(its last prompt position) + k. With ``use_cache`` every step feeds only the new tokens through the
KV cache (``eval/kv_cache.py``); without it every step recomputes the whole sequences, which is the
oracle the cache is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_v2pe.eval.kv_cache import kv_cache
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.v2pe.positions import AutoDelta, DeltaPolicy, compute_positions, parse_delta_policy


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


def packed_params(lengths: Sequence[int], device: torch.device) -> PackedSeqParams:
    """THD description of sub-samples of the given lengths, without padding."""
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    longest = int(max(lengths))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


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
) -> Generation:
    """Continue every prompt by up to ``max_new_tokens`` tokens (fewer after a stop token, which is kept)."""
    _check(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    positions, deltas = prompt_positions(
        model, prompts, resolve_delta_policy(model, delta_policy), max_new_tokens
    )
    lengths = [len(p.tokens) for p in prompts]
    tiles = [p.pixel_values for p in prompts if p.pixel_values is not None]
    prefill = {
        "input_ids": torch.tensor(np.concatenate([p.tokens for p in prompts]), device=device)[None],
        "positions": torch.from_numpy(np.concatenate(positions)).to(device)[None],
        "pixel_values": torch.cat(tiles).to(device) if tiles else None,
    }
    step = _CachedSteps(model, prefill, lengths) if use_cache else _RecomputedSteps(model, prefill, lengths)
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
    next_position = torch.tensor([p[-1] + 1 for p in positions], dtype=torch.float64, device=device)
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
    """Prefill once, then one new token per sequence per step through the KV cache."""

    def __init__(self, model: InternVLModel, prefill: dict, lengths: list[int]):
        self.model, self.prefill, self.lengths = model, prefill, lengths
        self.device = prefill["input_ids"].device
        self._cache = kv_cache(model)

    def __enter__(self) -> Self:
        self._cache.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cache.__exit__(*exc)

    def first(self) -> Tensor:
        logits = self.model(**self.prefill, packed_seq_params=packed_params(self.lengths, self.device))
        last = torch.tensor(np.cumsum(self.lengths) - 1, device=self.device)
        return logits[0, last]

    def next(self, tokens: Tensor, positions: Tensor) -> Tensor:
        params = packed_params([1] * tokens.numel(), self.device)
        return self.model(input_ids=tokens[None], positions=positions[None], packed_seq_params=params)[0]


class _RecomputedSteps:
    """Every step runs the prompts plus all tokens generated so far from scratch (no cache)."""

    def __init__(self, model: InternVLModel, prefill: dict, lengths: list[int]):
        self.model, self.prefill, self.lengths = model, prefill, lengths
        self.device = prefill["input_ids"].device
        self.tokens: list[Tensor] = []
        self.positions: list[Tensor] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def first(self) -> Tensor:
        return self._run()

    def next(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.append(tokens)
        self.positions.append(positions)
        return self._run()

    def _run(self) -> Tensor:
        """Logits at the last token of every sequence, for prompts extended by the tokens so far."""
        cu = np.concatenate([[0], np.cumsum(self.lengths)])
        ids, pos = self.prefill["input_ids"][0], self.prefill["positions"][0]
        pieces_ids, pieces_pos = [], []
        for j in range(len(self.lengths)):
            pieces_ids += [ids[cu[j] : cu[j + 1]], *(t[j : j + 1] for t in self.tokens)]
            pieces_pos += [pos[cu[j] : cu[j + 1]], *(p[j : j + 1] for p in self.positions)]
        lengths = [n + len(self.tokens) for n in self.lengths]
        logits = self.model(
            input_ids=torch.cat(pieces_ids)[None],
            positions=torch.cat(pieces_pos)[None],
            pixel_values=self.prefill["pixel_values"],
            packed_seq_params=packed_params(lengths, self.device),
        )
        return logits[0, torch.tensor(np.cumsum(lengths) - 1, device=self.device)]
