"""Picking the winner of a tuning run from its recorded timings, deterministically.

A plain argmin over medians flips between near-tied configs from one run to the next. Here:

* each config's samples (ms) are summarised by the median and the interquartile range (IQR,
  linear interpolation between order statistics; 0 for a single sample);
* the **noise** between two configs is ``max(IQR_a, IQR_b, rel_floor × min(median_a, median_b))``
  — the larger measured spread, and never under ``rel_floor`` (1 %) of the time, which is about
  the run-to-run drift of CUDA-event medians of memory-bound kernels;
* every config whose median is within the noise of the fastest median is **tied** with it, and
  the winner is the tied config that comes first in the canonical order (the heuristic default
  first, see :mod:`tilev4.autotune.space`).

The result depends only on the multiset of samples per config and on the canonical order — not
on the order of the samples or of the mapping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["REL_NOISE_FLOOR", "Selection", "Summary", "noise", "select_winner", "summarize"]

REL_NOISE_FLOOR = 0.01


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of one config's samples (ms)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Summary:
    """Median and quartiles of the finite samples; ValueError if there are none."""
    xs = sorted(float(x) for x in samples if math.isfinite(x))
    if not xs:
        raise ValueError("no finite samples")
    return Summary(_quantile(xs, 0.5), _quantile(xs, 0.25), _quantile(xs, 0.75), len(xs))


def noise(a: Summary, b: Summary, rel_floor: float = REL_NOISE_FLOOR) -> float:
    """The difference in medians below which ``a`` and ``b`` count as tied."""
    return max(a.iqr, b.iqr, rel_floor * min(a.median, b.median))


@dataclass(frozen=True)
class Selection:
    """The outcome: the winner, the fastest median, the configs tied with it, every summary."""

    winner: str
    fastest: str
    tied: tuple[str, ...]
    summaries: Mapping[str, Summary]


def select_winner(
    timings: Mapping[str, Sequence[float]], order: Sequence[str], rel_floor: float = REL_NOISE_FLOOR
) -> Selection:
    """The winning config label among ``timings`` (label → samples in ms).

    Args:
        timings: samples per config label; configs without a finite sample are ignored.
        order: canonical order of the labels (every label of ``timings`` must appear).
        rel_floor: the relative noise floor (see the module docstring).

    Raises:
        ValueError: no config has a finite sample, or a label is missing from ``order``.
    """
    rank = {label: i for i, label in enumerate(order)}
    missing = [label for label in timings if label not in rank]
    if missing:
        raise ValueError(f"configs missing from the canonical order: {missing}")
    summaries: dict[str, Summary] = {}
    for label in sorted(timings, key=rank.__getitem__):
        try:
            summaries[label] = summarize(timings[label])
        except ValueError:
            continue
    if not summaries:
        raise ValueError("no config has a finite timing")
    labels = list(summaries)  # canonical order
    fastest = min(labels, key=lambda c: (summaries[c].median, rank[c]))
    best = summaries[fastest]
    tied = tuple(c for c in labels if summaries[c].median - best.median <= noise(summaries[c], best, rel_floor))
    return Selection(winner=tied[0], fastest=fastest, tied=tied, summaries=summaries)
