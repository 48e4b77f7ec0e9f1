"""Winner selection from recorded timings: noise-aware ties, canonical order, order-independence."""

import itertools
import random

import pytest

from tilev4.autotune.select import REL_NOISE_FLOOR, noise, select_winner, summarize


def _samples(median: float, spread: float, n: int = 21, seed: int = 0) -> list[float]:
    """``n`` samples with the given median and an interquartile range of about ``spread``."""
    rng = random.Random(seed)
    xs = [median + spread * (i / (n - 1) - 0.5) * 2 for i in range(n)]  # uniform on [m - s, m + s]: IQR = s
    rng.shuffle(xs)
    return xs


def test_summary_median_and_iqr():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.iqr, s.n) == (3.0, 2.0, 4.0, 2.0, 5)
    assert summarize([7.0]).iqr == 0.0
    assert summarize([1.0, float("nan"), float("inf"), 3.0]).median == 2.0  # non-finite samples dropped
    with pytest.raises(ValueError):
        summarize([float("nan")])


def test_noise_has_a_relative_floor():
    a, b = summarize([1.0] * 5), summarize([2.0] * 5)
    assert noise(a, b) == pytest.approx(REL_NOISE_FLOOR * 1.0)
    c = summarize([0.9, 1.0, 1.1, 1.2])
    assert noise(c, a) == pytest.approx(c.iqr)


def test_clear_winner():
    t = {"a": _samples(1.0, 0.01), "b": _samples(0.5, 0.01), "c": _samples(0.8, 0.01)}
    sel = select_winner(t, ["a", "b", "c"])
    assert sel.winner == "b" == sel.fastest
    assert sel.tied == ("b",)


def test_near_tie_goes_to_the_earliest_in_canonical_order():
    # "late" is 0.5 % faster than "early": within the 1 % floor, so the earlier config wins
    t = {"late": [0.995] * 9, "early": [1.0] * 9, "slow": [1.2] * 9}
    sel = select_winner(t, ["early", "slow", "late"])
    assert sel.fastest == "late"
    assert sel.winner == "early"
    assert set(sel.tied) == {"early", "late"}
    # reversed canonical order: now "late" is earlier
    assert select_winner(t, ["late", "early", "slow"]).winner == "late"


def test_measured_spread_widens_the_tie():
    # 3 % apart, but each config's interquartile spread is 5 %: tied
    t = {"a": _samples(1.03, 0.05, seed=1), "b": _samples(1.00, 0.05, seed=2)}
    assert select_winner(t, ["a", "b"]).winner == "a"
    # same medians, tight spreads: b is measurably faster
    t = {"a": _samples(1.03, 0.002, seed=1), "b": _samples(1.00, 0.002, seed=2)}
    assert select_winner(t, ["a", "b"]).winner == "b"


def test_winner_independent_of_sample_and_mapping_order():
    base = {
        "c0": _samples(1.000, 0.004, seed=3),
        "c1": _samples(0.993, 0.004, seed=4),  # tied with c2 and c0
        "c2": _samples(0.990, 0.004, seed=5),
        "c3": _samples(0.980, 0.030, seed=6),  # fastest by median, but its spread ties it with c0..c2
        "c4": _samples(1.500, 0.010, seed=7),
    }
    order = ["c0", "c1", "c2", "c3", "c4"]
    expected = select_winner(base, order).winner
    assert expected == "c0" and select_winner(base, order).fastest == "c3"
    rng = random.Random(0)
    for perm in itertools.islice(itertools.permutations(base), 0, None, 7):
        shuffled = {}
        for label in perm:
            xs = list(base[label])
            rng.shuffle(xs)
            shuffled[label] = xs
        assert select_winner(shuffled, order).winner == expected


def test_failed_configs_are_ignored_and_unknown_labels_rejected():
    t = {"a": [float("nan")] * 3, "b": [2.0, 2.0], "c": []}
    assert select_winner(t, ["a", "b", "c"]).winner == "b"
    with pytest.raises(ValueError, match="no config has a finite timing"):
        select_winner({"a": [float("nan")]}, ["a"])
    with pytest.raises(ValueError, match="missing from the canonical order"):
        select_winner({"x": [1.0]}, ["a"])
