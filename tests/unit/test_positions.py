"""V2PE positions and δ policies, checked against values computed independently of the code under test."""

from fractions import Fraction

import numpy as np
import pytest

from megatron_v2pe.v2pe.positions import (
    DELTA_CANDIDATES,
    AutoDelta,
    FixedDelta,
    RandomDelta,
    UnitDelta,
    build_positions,
    compute_positions,
    parse_delta_policy,
    visual_runs,
)

# --------------------------------------------------------------------------------------------------
# Independent references and data


def reference_positions(mask, deltas, cu_seqlens=None) -> list[Fraction]:
    """The definition, token by token, in exact rational arithmetic."""
    restarts = {0} if cu_seqlens is None else set(int(c) for c in cu_seqlens[:-1])
    positions, run, previous_visual, p = [], -1, False, Fraction(0)
    for i, visual in enumerate(mask):
        if visual and not previous_visual:
            run += 1
        previous_visual = bool(visual)
        if i in restarts:
            p = Fraction(0)
        else:
            p += Fraction(deltas[run]) if visual else 1
        positions.append(p)
    return positions


def random_packed_mask(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Alternating text / image pieces, random sub-sample cuts, no image crossing a cut."""
    lengths, visual = [], bool(rng.integers(2))
    while sum(lengths) < rng.integers(1, 200):
        lengths.append(int(rng.integers(1, 10 if visual else 6)))
        visual = not visual
    kinds = np.arange(len(lengths)) % 2 == (0 if visual else 1)
    mask = np.repeat(kinds, lengths)
    n = mask.size
    cuts = rng.choice(np.arange(1, n), size=min(int(rng.integers(0, 5)), n - 1), replace=False)
    cu = np.concatenate(([0], np.sort(cuts), [n])).astype(np.int64)
    for b in cu[1:-1]:
        if mask[b - 1] and mask[b]:
            mask[b - 1] = False
    return mask, cu


def count_runs(mask) -> int:
    return sum(1 for i, v in enumerate(mask) if v and (i == 0 or not mask[i - 1]))


def hand_example_mask() -> np.ndarray:
    """100 text tokens, <img> at index 100, 2 tiles x 256 visual tokens, </img>, 4 more text tokens."""
    return np.array([False] * 101 + [True] * 512 + [False] * 5)


# --------------------------------------------------------------------------------------------------
# compute_positions


def test_delta_one_is_arange_single_sequence():
    mask = hand_example_mask()
    np.testing.assert_array_equal(compute_positions(mask, [1.0]), np.arange(mask.size))


@pytest.mark.parametrize("seed", range(10))
def test_delta_one_is_arange_per_subsample(seed):
    mask, cu = random_packed_mask(np.random.default_rng(seed))
    expected = np.concatenate([np.arange(length) for length in np.diff(cu)])
    positions = compute_positions(mask, np.ones(count_runs(mask)), cu)
    np.testing.assert_array_equal(positions, expected)
    assert positions.dtype == np.float64


def test_hand_worked_example():
    positions = compute_positions(hand_example_mask(), [0.25])
    assert positions[100] == 100  # <img>
    assert positions[101] == 100.25  # first visual token
    assert positions[612] == 228  # last visual token: 100 + 512/4
    assert positions[613] == 229  # </img>
    assert positions[-1] == 233


def test_text_after_an_image_is_last_visual_plus_one_when_n_delta_is_fractional():
    """The paper's rule (text +1 after the last visual position), not the reference's ceil(last) + 1:
    34 visual tokens at δ = 1/4 after <img> at 66 end at 74.5, so </img> is at 75.5 (the reference: 76)."""
    mask = np.zeros(110, dtype=bool)
    mask[67:101] = True
    positions = compute_positions(mask, [0.25])
    assert (positions[66], positions[100], positions[101]) == (66, 74.5, 75.5)


def test_hand_worked_example_after_another_subsample():
    first = np.array([False, True, True, True, False])
    mask = np.concatenate([first, hand_example_mask()])
    positions = compute_positions(mask, [0.5, 0.25], [0, first.size, mask.size])
    np.testing.assert_array_equal(positions[: first.size], [0, 0.5, 1, 1.5, 2.5])
    np.testing.assert_array_equal(positions[first.size :], compute_positions(hand_example_mask(), [0.25]))


def test_subsample_starting_with_an_image():
    positions = compute_positions([True, True, True, False], [0.5], [0, 4])
    np.testing.assert_array_equal(positions, [0, 0.5, 1, 2])


@pytest.mark.parametrize("seed", range(50))
def test_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    mask, cu = random_packed_mask(rng)
    runs = count_runs(mask)

    dyadic = rng.choice(DELTA_CANDIDATES, size=runs)
    expected = [float(p) for p in reference_positions(mask, dyadic, cu)]
    np.testing.assert_array_equal(compute_positions(mask, dyadic, cu), expected)

    arbitrary = rng.uniform(0.01, 1.0, size=runs)
    expected = [float(p) for p in reference_positions(mask, arbitrary, cu)]
    np.testing.assert_allclose(compute_positions(mask, arbitrary, cu), expected, rtol=0, atol=1e-9)

    if cu.size == 2:  # one sub-sample: cu_seqlens=None must mean the same thing
        single = compute_positions(mask, arbitrary)
        np.testing.assert_array_equal(single, compute_positions(mask, arbitrary, cu))


def test_exact_at_one_million_tokens_with_smallest_delta():
    n, rng = 1 << 20, np.random.default_rng(0)
    pieces = []
    while sum(len(p) for p in pieces) < n:
        pieces.append(np.zeros(int(rng.integers(50, 180)), dtype=bool))
        pieces.append(np.ones(256 * int(rng.integers(1, 8)), dtype=bool))
    mask = np.concatenate(pieces)[:n]
    assert 0.85 < mask.mean() < 0.95

    positions = compute_positions(mask, np.full(count_runs(mask), 1 / 256))

    increments = np.where(mask, 1, 256)  # in units of 1/256
    increments[0] = 0
    np.testing.assert_array_equal(positions * 256, np.cumsum(increments))
    assert np.all(np.diff(positions) > 0)
    for i in rng.choice(n, size=300, replace=False):
        visual = int(np.count_nonzero(mask[1 : i + 1]))
        assert Fraction(positions[i]) == (i - visual) + Fraction(visual, 256)
    # The same positions in float32 collide: this is why positions are float64.
    assert not np.all(np.diff(positions.astype(np.float32)) > 0)


def test_empty_input():
    assert compute_positions(np.zeros(0, dtype=bool), []).shape == (0,)


# --------------------------------------------------------------------------------------------------
# visual_runs


def test_visual_runs():
    starts, lengths = visual_runs([1, 1, 0, 0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(starts, [0, 4, 6])
    np.testing.assert_array_equal(lengths, [2, 1, 3])


@pytest.mark.parametrize(
    "mask, starts, lengths",
    [([], [], []), ([False, False], [], []), ([True, True, True], [0], [3]), ([False, True], [1], [1])],
)
def test_visual_runs_edge_cases(mask, starts, lengths):
    got_starts, got_lengths = visual_runs(np.array(mask, dtype=bool))
    np.testing.assert_array_equal(got_starts, starts)
    np.testing.assert_array_equal(got_lengths, lengths)


# --------------------------------------------------------------------------------------------------
# Input errors


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((2, 3), dtype=bool), r"visual_mask must be 1-D, got shape \(2, 3\)"),
        (np.array(["a", "b"]), "visual_mask must be bool"),
        (np.array([0, 1, 2]), "only 0/1, got 2 at index 2"),
        (np.array([0.0, 0.5]), "only 0/1, got 0.5 at index 1"),
    ],
)
def test_bad_mask(mask, match):
    with pytest.raises(ValueError, match=match):
        compute_positions(mask, [])


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.5, np.nan, np.inf])
def test_delta_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=rf"delta\[1\] = {bad!r} is outside \(0, 1\]"):
        compute_positions([True, False, True], [0.5, bad])


def test_wrong_number_of_deltas():
    with pytest.raises(ValueError, match="got 1 deltas for 2 visual runs"):
        compute_positions([True, False, True], [0.5])
    with pytest.raises(ValueError, match="deltas must be 1-D"):
        compute_positions([True, False, True], [[0.5, 0.5]])


def test_run_crossing_a_subsample_boundary():
    with pytest.raises(ValueError, match=r"visual run 1 \(tokens 3\.\.6\) crosses .* cu_seqlens\[1\] = 5"):
        compute_positions([1, 0, 0, 1, 1, 1, 1, 0], [1, 1], [0, 5, 8])


def test_adjacent_images_in_adjacent_subsamples_form_one_crossing_run():
    mask = [0, 1, 1, 1, 1, 0]  # image of sub-sample 0 ends at 2, image of sub-sample 1 starts at 3
    with pytest.raises(ValueError, match=r"visual run 0 \(tokens 1\.\.4\) crosses .* = 3.*<img>"):
        compute_positions(mask, [1], [0, 3, 6])


@pytest.mark.parametrize(
    "cu, match",
    [
        ([1, 4], "must start at 0, got 1"),
        ([0, 3], r"must end at len\(visual_mask\) = 4, got 3"),
        ([0, 3, 2, 4], r"strictly increasing, got cu_seqlens\[1\] = 3 then cu_seqlens\[2\] = 2"),
        ([0, 2, 2, 4], "strictly increasing"),
        (np.array([0.0, 4.0]), "must be integers, got dtype float64"),
        (np.array([[0, 4]]), "non-empty 1-D"),
        (np.array([], dtype=np.int64), "non-empty 1-D"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        compute_positions([False] * 4, [], cu)


# --------------------------------------------------------------------------------------------------
# δ policies

MANY_IMAGES = np.tile([False, False, True, True, True], 2000)  # 2000 images


def test_unit_and_fixed_policies():
    np.testing.assert_array_equal(UnitDelta().deltas(MANY_IMAGES), np.ones(2000))
    np.testing.assert_array_equal(FixedDelta(0.25).deltas(MANY_IMAGES), np.full(2000, 0.25))


@pytest.mark.parametrize("bad", [0, -1, 1.01, float("nan")])
def test_fixed_policy_rejects_bad_delta(bad):
    with pytest.raises(ValueError, match="outside"):
        FixedDelta(bad)


def test_random_policy():
    policy = RandomDelta()
    first = policy.deltas(MANY_IMAGES, rng=np.random.default_rng(7))
    again = policy.deltas(MANY_IMAGES, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2000,)
    assert set(first) == set(DELTA_CANDIDATES)  # each image draws on its own: every candidate shows up

    custom = RandomDelta((0.5, 0.125)).deltas(MANY_IMAGES, rng=np.random.default_rng(0))
    assert set(custom) == {0.5, 0.125}


def test_random_policy_needs_generator_and_valid_candidates():
    with pytest.raises(ValueError, match=r"numpy\.random\.Generator"):
        RandomDelta().deltas(MANY_IMAGES)
    with pytest.raises(ValueError, match="at least one candidate"):
        RandomDelta(())
    with pytest.raises(ValueError, match=r"delta\[1\] = 2.0 is outside"):
        RandomDelta((0.5, 2))


def brute_force_auto_delta(mask, window) -> float:
    """The largest candidate whose rational positions all stay below the window."""
    for delta in DELTA_CANDIDATES:
        if max(reference_positions(mask, [delta] * count_runs(mask))) < window:
            return delta
    raise AssertionError("nothing fits")


@pytest.mark.parametrize("window", [40, 100, 300, 1000, 5000])
@pytest.mark.parametrize("starts_with_image", [False, True])
def test_auto_policy_matches_brute_force(window, starts_with_image):
    mask = np.array(([True] * 7 if starts_with_image else []) + [False] * 20 + [True] * 512 + [False] * 3)
    deltas = AutoDelta(window).deltas(mask)
    chosen = brute_force_auto_delta(mask, window)
    np.testing.assert_array_equal(deltas, [chosen] * count_runs(mask))
    assert compute_positions(mask, deltas).max() < window
    if chosen < 1:  # the next larger candidate must not fit
        larger = np.full(count_runs(mask), chosen * 2)
        assert compute_positions(mask, larger).max() >= window


def test_auto_policy_is_chosen_per_subsample():
    light = np.array([False] * 10 + [True] * 16 + [False] * 2)
    heavy = np.array([False] * 10 + [True] * 2048 + [False] * 2 + [True] * 256 + [False])
    mask, cu = np.concatenate([light, heavy, light]), np.cumsum([0, light.size, heavy.size, light.size])
    window = 200
    deltas = AutoDelta(window).deltas(mask, cu)
    light_delta, heavy_delta = brute_force_auto_delta(light, window), brute_force_auto_delta(heavy, window)
    assert (light_delta, heavy_delta) == (1.0, 1 / 16)
    np.testing.assert_array_equal(deltas, [light_delta, heavy_delta, heavy_delta, light_delta])
    positions = compute_positions(mask, deltas, cu)
    assert positions.max() < window


def test_auto_policy_errors_when_nothing_fits():
    with pytest.raises(ValueError, match=r"sub-sample 1 \(60 text \+ 0 visual .* window 50.*text alone"):
        AutoDelta(50).deltas(np.zeros(70, dtype=bool), [0, 10, 70])
    too_many_images = np.array([False] * 10 + [True] * 256 * 256 + [False])
    with pytest.raises(
        ValueError, match=r"11 text \+ 65536 visual .* window 200: .* position 266 even with δ = 1/256;"
    ):
        AutoDelta(200).deltas(too_many_images)
    with pytest.raises(ValueError, match="positive integer window"):
        AutoDelta(0)


def test_build_positions():
    positions, deltas = build_positions(hand_example_mask(), FixedDelta(0.25))
    np.testing.assert_array_equal(deltas, [0.25])
    assert positions[613] == 229


# --------------------------------------------------------------------------------------------------
# Config strings


@pytest.mark.parametrize(
    "spec, policy",
    [
        ("none", UnitDelta()),
        ("fixed:0.25", FixedDelta(0.25)),
        ("fixed:1/4", FixedDelta(0.25)),
        ("random", RandomDelta()),
        ("random:1/2,1/8", RandomDelta((0.5, 0.125))),
        ("auto:32768", AutoDelta(32768)),
    ],
)
def test_parse_delta_policy(spec, policy):
    assert parse_delta_policy(spec) == policy
    assert parse_delta_policy(policy.spec) == policy


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "unknown δ policy '';.*'none'.*'fixed:<δ>'.*'random'.*'auto:<window>'"),
        ("linear", "unknown δ policy 'linear'"),
        ("fixed", "unknown δ policy 'fixed'"),
        ("none:1", "unknown δ policy"),
        ("auto:", "unknown δ policy"),
        ("auto:1.5", "unknown δ policy"),
        ("auto:0", "positive integer window"),
        ("fixed:abc", "bad δ 'abc'"),
        ("fixed:1/0", "bad δ '1/0'"),
        ("fixed:2", r"delta\[0\] = 2.0 is outside"),
    ],
)
def test_parse_delta_policy_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_delta_policy(spec)
