"""Synthetic associative recall across images: a task that a tiny V2PE language model learns on a CPU.

There is no vision tower yet, so an "image" is `<img>`, a run of visual tokens with random ids from a
range of their own (stand-ins for image features), then `</img>`. A sample lists key-value pairs, each
followed by an image, then a `<query>` marker and some of the keys again, each followed by its value::

    <bos> k1 v1 <img> x x x x </img> k2 v2 <img> x x </img> k3 v3 <img> x x x </img> <query> k3 v3 k1 v1

Only the answers (the values after `<query>`) carry loss weight. Everything else is random, so
weighting it would add a constant floor that hides the learning curve; with the answers alone the loss
goes from ln(values) (guessing) through ln(pairs) (copying some value of the sample) to 0 (recall).
Recall means finding the earlier copy of the query key and reading the token right after it, a relative
position that the model must learn to read across images whose δ changes from image to image.

Token ids are laid out as [specials | keys | values | visual], so the visual mask is a comparison.
Samples are packed into THD micro-batches whose V2PE positions restart in every sub-sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_v2pe.v2pe.positions import DeltaPolicy, build_positions

PAD, BOS, IMG_START, IMG_END, QUERY = range(5)
NUM_SPECIAL_TOKENS = 5


@dataclass(frozen=True)
class RecallTask:
    """Sizes of the task. Images get 1 to `max_image_tokens` visual tokens, as many as fit in
    `max_sample_tokens` when a sample has `max_pairs` pairs."""

    num_keys: int = 32
    num_values: int = 32
    num_visual: int = 64
    min_pairs: int = 2
    max_pairs: int = 6
    num_queries: int = 3
    max_sample_tokens: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.min_pairs <= self.max_pairs <= self.num_keys:
            raise ValueError(
                f"need 1 <= min_pairs <= max_pairs <= num_keys (keys are distinct within a sample), "
                f"got {self.min_pairs}, {self.max_pairs}, {self.num_keys}"
            )
        if self.num_queries < 1 or self.num_values < 1 or self.num_visual < 1:
            raise ValueError("num_queries, num_values and num_visual must be positive")
        if self.max_image_tokens < 1:
            raise ValueError(
                f"max_sample_tokens = {self.max_sample_tokens} leaves no room for images: a sample "
                f"with {self.max_pairs} pairs has up to {self.max_text_tokens} text tokens"
            )

    @property
    def first_key(self) -> int:
        return NUM_SPECIAL_TOKENS

    @property
    def first_value(self) -> int:
        return self.first_key + self.num_keys

    @property
    def first_visual(self) -> int:
        return self.first_value + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.first_visual + self.num_visual

    @property
    def max_text_tokens(self) -> int:
        """<bos>, then k v <img> </img> per pair, then <query> and a key and value per query."""
        return 2 + 4 * self.max_pairs + 2 * min(self.num_queries, self.max_pairs)

    @property
    def max_image_tokens(self) -> int:
        return (self.max_sample_tokens - self.max_text_tokens) // self.max_pairs

    def visual_mask(self, tokens: np.ndarray) -> np.ndarray:
        return tokens >= self.first_visual


@dataclass(frozen=True)
class RecallSample:
    """One sample; labels and weights are already shifted: entry i is about predicting token i + 1."""

    tokens: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], PAD at the last token
    loss_weights: np.ndarray  # float32 [n], 1 where the label is an answer

    def __len__(self) -> int:
        return self.tokens.size


def sample_recall(task: RecallTask, rng: np.random.Generator) -> RecallSample:
    """A random sample: distinct keys, random values, an image after each pair, then the queries."""
    num_pairs = int(rng.integers(task.min_pairs, task.max_pairs + 1))
    keys = task.first_key + rng.choice(task.num_keys, size=num_pairs, replace=False)
    values = task.first_value + rng.integers(task.num_values, size=num_pairs)
    pieces, answer = [[BOS]], [[False]]
    for key, value in zip(keys, values, strict=True):
        image = task.first_visual + rng.integers(task.num_visual, size=rng.integers(1, task.max_image_tokens + 1))
        pieces += [[key, value, IMG_START], image, [IMG_END]]
        answer += [[False] * 3, [False] * image.size, [False]]
    pieces.append([QUERY])
    answer.append([False])
    for q in rng.choice(num_pairs, size=min(task.num_queries, num_pairs), replace=False):
        pieces.append([keys[q], values[q]])
        answer.append([False, True])
    tokens = np.concatenate(pieces).astype(np.int64)
    is_answer = np.concatenate(answer)
    return RecallSample(
        tokens=tokens,
        labels=np.append(tokens[1:], PAD),
        loss_weights=np.append(is_answer[1:], False).astype(np.float32),
    )


@dataclass(frozen=True)
class SyntheticRecallBatch:
    """A packed THD micro-batch of recall samples, ready for V2PEGPTModel."""

    tokens: torch.Tensor  # int64 [1, t]
    labels: torch.Tensor  # int64 [1, t]
    loss_weights: torch.Tensor  # float32 [1, t]
    positions: torch.Tensor  # float64 [1, t], restarting at 0 in every sub-sample
    cu_seqlens: torch.Tensor  # int32 [sub-samples + 1]
    max_seqlen: int
    deltas: np.ndarray  # float64, the δ of every image in order

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def packed_seq_params(self) -> PackedSeqParams:
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def pack_samples(
    task: RecallTask, samples: Sequence[RecallSample], policy: DeltaPolicy, rng: np.random.Generator
) -> SyntheticRecallBatch:
    """Concatenate samples into one THD micro-batch; `policy` picks the δ of every image."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    lengths = np.array([len(s) for s in samples])
    cu_seqlens = np.concatenate(([0], np.cumsum(lengths)))
    tokens = np.concatenate([s.tokens for s in samples])
    positions, deltas = build_positions(task.visual_mask(tokens), policy, cu_seqlens, rng)

    def row(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts))[None]

    return SyntheticRecallBatch(
        tokens=torch.from_numpy(tokens)[None],
        labels=row([s.labels for s in samples]),
        loss_weights=row([s.loss_weights for s in samples]),
        positions=torch.from_numpy(positions)[None],
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        deltas=deltas,
    )


def recall_batches(
    task: RecallTask, max_tokens: int, policy: DeltaPolicy, seed: int
) -> Iterator[SyntheticRecallBatch]:
    """Endless packs of at most `max_tokens` tokens, deterministic in `seed`. Samples are packed whole:
    the one that does not fit opens the next pack."""
    if task.max_sample_tokens > max_tokens:
        raise ValueError(
            f"a pack of {max_tokens} tokens cannot hold a sample of up to {task.max_sample_tokens} "
            "tokens; raise max_tokens or lower max_sample_tokens"
        )
    rng = np.random.default_rng(seed)
    pending = sample_recall(task, rng)
    while True:
        samples, size = [], 0
        while size + len(pending) <= max_tokens:
            samples.append(pending)
            size += len(pending)
            pending = sample_recall(task, rng)
        yield pack_samples(task, samples, policy, rng)
