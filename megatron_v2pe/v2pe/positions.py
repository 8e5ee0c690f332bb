"""V2PE token positions and the policies that pick δ for each image.

Every token of a sample gets a real-valued position (V2PE, arXiv 2412.09616): p_0 = 0, then each text
token adds 1 and each visual token adds the δ of its image (0 < δ ≤ 1). One image is one maximal run of
visual tokens and all its tiles share one δ. Packed sequences restart positions at 0 in every sub-sample.

Positions are float64 and computed in closed form per constant run of tokens, never by a long running
sum of float increments: with dyadic δ (the candidates below) every position is then exact, even for
millions of tokens. float32 would not do: δ = 1/256 steps above 2^16 collapse together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

DELTA_CANDIDATES: tuple[float, ...] = tuple(2.0**-k for k in range(9))
"""Δ = {1, 1/2, …, 1/256}, largest first: the δ values the reference trains with."""


# --------------------------------------------------------------------------------------------------
# Input validation


def _as_visual_mask(visual_mask: np.ndarray) -> np.ndarray:
    """The mask as a 1-D bool array; 0/1 integers or floats are accepted so callers may pass token flags."""
    mask = np.asarray(visual_mask)
    if mask.ndim != 1:
        raise ValueError(f"visual_mask must be 1-D, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "iuf":
        raise ValueError(f"visual_mask must be bool (or 0/1 numbers), got dtype {mask.dtype}")
    bad = np.flatnonzero((mask != 0) & (mask != 1))
    if bad.size:
        raise ValueError(
            f"visual_mask must hold only 0/1, got {mask[bad[0]].item()!r} at index {bad[0]} "
            f"({bad.size} such entries)"
        )
    return mask.astype(bool)


def _as_cu_seqlens(cu_seqlens: np.ndarray | None, num_tokens: int) -> np.ndarray:
    """Sub-sample boundaries [0, l1, l1+l2, ..., num_tokens] as int64; None means one sub-sample."""
    if cu_seqlens is None:
        return np.array([0, num_tokens] if num_tokens else [0], dtype=np.int64)
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size == 0:
        raise ValueError(f"cu_seqlens must be a non-empty 1-D array, got shape {cu.shape}")
    if cu.dtype.kind not in "iu":
        raise ValueError(f"cu_seqlens must be integers, got dtype {cu.dtype}")
    cu = cu.astype(np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must end at len(visual_mask) = {num_tokens}, got {cu[-1]}")
    steps = np.diff(cu)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"cu_seqlens must be strictly increasing, got cu_seqlens[{i}] = {cu[i]} "
            f"then cu_seqlens[{i + 1}] = {cu[i + 1]}"
        )
    return cu


def _check_delta_values(deltas: np.ndarray) -> None:
    """δ must lie in (0, 1]: 0 would give equal positions, > 1 would stretch images beyond text."""
    bad = np.flatnonzero(~(np.isfinite(deltas) & (deltas > 0) & (deltas <= 1)))
    if bad.size:
        i = bad[0]
        raise ValueError(f"delta[{i}] = {deltas[i].item()!r} is outside (0, 1]")


def _as_deltas(deltas: np.ndarray, num_runs: int) -> np.ndarray:
    """One valid δ per visual run, as float64."""
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"deltas must be 1-D (one δ per image), got shape {d.shape}")
    if d.size != num_runs:
        raise ValueError(f"got {d.size} deltas for {num_runs} visual runs (images); need one δ per image")
    _check_delta_values(d)
    return d


# --------------------------------------------------------------------------------------------------
# Runs and positions


def _run_starts(mask: np.ndarray) -> np.ndarray:
    """Start index of every maximal constant run (text or visual) of a non-empty mask."""
    changes = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    return np.concatenate(([0], changes))


def visual_runs(visual_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the maximal runs of visual tokens, in order: one run is one image."""
    mask = _as_visual_mask(visual_mask)
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = _run_starts(mask)
    lengths = np.diff(starts, append=mask.size)
    is_visual = mask[starts]
    return starts[is_visual], lengths[is_visual]


def _check_runs_inside_subsamples(mask: np.ndarray, cu: np.ndarray) -> None:
    """A boundary with visual tokens on both sides means an image spans two sub-samples."""
    inner = cu[1:-1]
    crossing = inner[mask[inner - 1] & mask[inner]]
    if crossing.size:
        boundary = int(crossing[0])
        starts, lengths = visual_runs(mask)
        run = int(np.searchsorted(starts, boundary, side="right")) - 1
        first, last = starts[run], starts[run] + lengths[run] - 1
        raise ValueError(
            f"visual run {run} (tokens {first}..{last}) crosses the sub-sample boundary "
            f"cu_seqlens[{int(np.searchsorted(cu, boundary))}] = {boundary}; a run is one image, so "
            "packers must put a text token (e.g. <img>, </img>) around every image"
        )


def compute_positions(
    visual_mask: np.ndarray, deltas: np.ndarray, cu_seqlens: np.ndarray | None = None
) -> np.ndarray:
    """Float64 V2PE positions of every token.

    visual_mask: 1-D bool, True for `<IMG_CONTEXT>` slots. deltas: one δ in (0, 1] per maximal run of
    True (one image), in order over the whole array. cu_seqlens: packed sub-sample boundaries; positions
    restart at 0 in each. Runs are defined on the flat mask, so an image may not cross a boundary: two
    images in adjacent sub-samples must be separated by a text token (real data always has `<img>`,
    `</img>`).

    The array is cut into pieces (constant runs, also cut at sub-sample starts). Within a piece with
    step c (1 for text, δ for visual) the k-th token (k = 1, 2, …) sits at base + c·k, where base is the
    integer text count plus the Σ δ·N of earlier pieces of the sub-sample, minus the step of the
    sub-sample's first token (so that it sits at 0). Every term is exact for dyadic δ.
    """
    mask = _as_visual_mask(visual_mask)
    n = mask.size
    cu = _as_cu_seqlens(cu_seqlens, n)
    if n == 0:
        _as_deltas(deltas, 0)
        return np.zeros(0, dtype=np.float64)
    run_starts = _run_starts(mask)
    d = _as_deltas(deltas, int(np.count_nonzero(mask[run_starts])))
    _check_runs_inside_subsamples(mask, cu)

    # Pieces: runs cut at sub-sample starts. Boundaries only cut text runs, so visual pieces are images.
    piece_starts = np.union1d(run_starts, cu[:-1])
    lengths = np.diff(piece_starts, append=n)
    is_visual = mask[piece_starts]
    step = np.ones(piece_starts.size)
    step[is_visual] = d

    text_units = np.where(is_visual, 0, lengths)
    visual_units = np.where(is_visual, step * lengths, 0.0)
    text_before = np.cumsum(text_units) - text_units
    visual_before = np.cumsum(visual_units) - visual_units

    # Restart at every sub-sample: subtract the totals before its first piece and its first token's step.
    first_piece = np.searchsorted(piece_starts, cu[:-1])
    pieces_per_subsample = np.diff(np.append(first_piece, piece_starts.size))
    first = np.repeat(first_piece, pieces_per_subsample)  # for each piece, its sub-sample's first piece
    first_is_visual = is_visual[first]
    base_text = text_before - text_before[first] - np.where(first_is_visual, 0, 1)
    base_visual = visual_before - visual_before[first] - np.where(first_is_visual, step[first], 0.0)
    base = base_text + base_visual

    # In place: k = i + 1 - piece start, then base + step·k (integers below 2^53 are exact in float64).
    positions = np.arange(1.0, n + 1.0)
    positions -= np.repeat(piece_starts.astype(np.float64), lengths)
    positions *= np.repeat(step, lengths)
    positions += np.repeat(base, lengths)
    return positions


# --------------------------------------------------------------------------------------------------
# δ policies


class DeltaPolicy(ABC):
    """Chooses one δ per image; `spec` is the config string that `parse_delta_policy` reads back."""

    @abstractmethod
    def deltas(
        self,
        visual_mask: np.ndarray,
        cu_seqlens: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One δ per visual run of `visual_mask`, float64."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The config string of this policy."""


def _num_images(visual_mask: np.ndarray) -> int:
    return visual_runs(visual_mask)[0].size


@dataclass(frozen=True)
class UnitDelta(DeltaPolicy):
    """δ = 1 for every image: ordinary integer positions (the InternVL2 baseline)."""

    def deltas(
        self,
        visual_mask: np.ndarray,
        cu_seqlens: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        return np.ones(_num_images(visual_mask))

    @property
    def spec(self) -> str:
        return "none"


@dataclass(frozen=True)
class FixedDelta(DeltaPolicy):
    """One δ for all images: the reference's evaluation setting (δ = 1/4)."""

    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", float(self.delta))
        _check_delta_values(np.array([self.delta]))

    def deltas(
        self,
        visual_mask: np.ndarray,
        cu_seqlens: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        return np.full(_num_images(visual_mask), self.delta)

    @property
    def spec(self) -> str:
        return f"fixed:{self.delta!r}"


@dataclass(frozen=True)
class RandomDelta(DeltaPolicy):
    """Each image draws its own δ uniformly from `candidates`: the training policy of the paper."""

    candidates: tuple[float, ...] = DELTA_CANDIDATES

    def __post_init__(self) -> None:
        candidates = tuple(float(c) for c in self.candidates)
        if not candidates:
            raise ValueError("random δ policy needs at least one candidate")
        _check_delta_values(np.array(candidates))
        object.__setattr__(self, "candidates", candidates)

    def deltas(
        self,
        visual_mask: np.ndarray,
        cu_seqlens: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        if rng is None:
            raise ValueError("the random δ policy needs a numpy.random.Generator: pass rng=")
        picks = rng.integers(len(self.candidates), size=_num_images(visual_mask))
        return np.asarray(self.candidates)[picks]

    @property
    def spec(self) -> str:
        if self.candidates == DELTA_CANDIDATES:
            return "random"
        return "random:" + ",".join(repr(c) for c in self.candidates)


@dataclass(frozen=True)
class AutoDelta(DeltaPolicy):
    """Per sub-sample, the largest δ in DELTA_CANDIDATES that keeps every position below `window`.

    Positions grow monotonically, so the maximum is the last token's:
    (text tokens - [first token is text]) + δ · (visual tokens - [first token is visual]).
    """

    window: int

    def __post_init__(self) -> None:
        if int(self.window) != self.window or self.window <= 0:
            raise ValueError(f"auto δ policy needs a positive integer window, got {self.window!r}")
        object.__setattr__(self, "window", int(self.window))

    def deltas(
        self,
        visual_mask: np.ndarray,
        cu_seqlens: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        mask = _as_visual_mask(visual_mask)
        cu = _as_cu_seqlens(cu_seqlens, mask.size)
        chosen = self._per_subsample(mask, cu)
        starts, _ = visual_runs(mask)
        return chosen[np.searchsorted(cu, starts, side="right") - 1]

    def _per_subsample(self, mask: np.ndarray, cu: np.ndarray) -> np.ndarray:
        """The chosen δ of every sub-sample."""
        visual_so_far = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        num_visual = np.diff(visual_so_far[cu])
        num_text = np.diff(cu) - num_visual
        first_visual = mask[cu[:-1]].astype(np.int64)
        candidates = np.asarray(DELTA_CANDIDATES)
        max_position = (num_text - (1 - first_visual))[:, None] + np.outer(
            num_visual - first_visual, candidates
        )
        fits = max_position < self.window
        stuck = np.flatnonzero(~fits.any(axis=1))
        if stuck.size:
            j = stuck[0]
            text_only = num_text[j] - (1 - first_visual[j])
            note = f" (its text alone reaches position {text_only})" if text_only >= self.window else ""
            raise ValueError(
                f"auto δ: sub-sample {j} ({num_text[j]} text + {num_visual[j]} visual tokens) does not fit "
                f"window {self.window}: its last token sits at position {max_position[j, -1]:g} even with "
                f"δ = {Fraction(candidates[-1])}{note}; use a larger window or shorter input"
            )
        return candidates[np.argmax(fits, axis=1)]

    @property
    def spec(self) -> str:
        return f"auto:{self.window}"


_VALID_SPECS = (
    "'none', 'fixed:<δ>' (e.g. fixed:0.25 or fixed:1/4), 'random', 'random:<δ>,<δ>,...', "
    "'auto:<window>' (e.g. auto:32768)"
)


def _parse_delta(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"bad δ {text!r}, write e.g. 0.25 or 1/4") from None


def parse_delta_policy(spec: str, default_window: int | None = None) -> DeltaPolicy:
    """The policy named by a config string: none | fixed:<δ> | random[:<δ>,...] | auto:<window>, and
    plain ``auto`` where the caller knows the window (``default_window``: the trained context)."""
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "none" and not arg:
            return UnitDelta()
        if kind == "fixed" and arg:
            return FixedDelta(_parse_delta(arg))
        if kind == "random":
            return RandomDelta(tuple(_parse_delta(a) for a in arg.split(","))) if arg else RandomDelta()
        if kind == "auto" and arg.strip().isdigit():
            return AutoDelta(int(arg))
        if spec.strip() == "auto" and default_window is not None:
            return AutoDelta(default_window)
    except ValueError as err:
        raise ValueError(f"bad δ policy {spec!r}: {err}; valid forms: {_VALID_SPECS}") from None
    raise ValueError(f"unknown δ policy {spec!r}; valid forms: {_VALID_SPECS}")


def build_positions(
    visual_mask: np.ndarray,
    policy: DeltaPolicy,
    cu_seqlens: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, deltas): pick δ per image with `policy`, then compute the positions."""
    deltas = policy.deltas(visual_mask, cu_seqlens, rng)
    return compute_positions(visual_mask, deltas, cu_seqlens), deltas
