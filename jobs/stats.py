"""Intervals and verdicts for the numbers the reports print (issue #22).

- `wilson`: the 95 % Wilson score interval of an accuracy k/n (Wilson 1927; Brown, Cai & DasGupta 2001 show
  it keeps its coverage at small n, where the normal interval does not);
- `bootstrap_auc`: a ROC AUC with its percentile bootstrap interval (resampling positives and negatives
  separately, so every resample has both classes), and `decimals` says how many places that interval
  supports;
- `paired_difference`: the mean difference of two defenses' correctness on the same examples, with its paired
  percentile bootstrap interval (resampling examples, so each keeps its pair);
- `verdict`: ours against a paper's number, one of four outcomes decided in this order: *n too small*,
  *undecided* (our interval is too wide to tell a gap from none), *reproduced* (the paper's number lies in
  our interval), *not reproduced* (above or below it).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from jobs.masking import is_check

Z95 = statistics.NormalDist().inv_cdf(0.975)
MIN_N = 20  # below: "n too small", whatever the interval
MAX_HALF_WIDTH = 0.10  # above: "undecided", the interval could not tell a real gap from none


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __contains__(self, x: float) -> bool:
        return self.low <= x <= self.high


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """k successes of n: k/n with its Wilson score interval (n = 0: the whole [0, 1])."""
    if n == 0:
        return Interval(math.nan, 0.0, 1.0, 0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exactly the bound at the edges (not 1e-17 from it)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(p, low, high, n)


def bootstrap_auc(labels, scores, *, resamples: int = 2000, seed: int = 0) -> Interval:
    """ROC AUC of `scores` for binary `labels` (1 = attacked) with its 95 % percentile bootstrap interval,
    positives and negatives resampled separately; n is the smaller class's size."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        raise ValueError("an AUC needs both attacked and clean examples")
    value = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, len(pos), (resamples, len(pos)))]
    q = neg[rng.integers(0, len(neg), (resamples, len(neg)))]
    # AUC = P(score_pos > score_neg) + 0.5 P(tie), per resample by ranks (Mann-Whitney U)
    both = np.concatenate([p, q], axis=1)
    ranks = _average_ranks(both)
    u = ranks[:, : len(pos)].sum(1) - len(pos) * (len(pos) + 1) / 2
    aucs = u / (len(pos) * len(neg))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return Interval(value, float(low), float(high), int(min(len(pos), len(neg))))


def paired_difference(a, b, *, resamples: int = 2000, seed: int = 0) -> Interval:
    """mean(a - b) of paired per-example outcomes (e.g. correct under defense A and under B on the same examples)
    with its 95 % percentile bootstrap interval over examples; n = the pairs."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not len(d):
        return Interval(math.nan, -1.0, 1.0, 0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(d.mean()), float(low), float(high), len(d))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Row-wise ranks 1..m of a 2-D array, ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(a, axis=1, kind="stable")
    sorted_ = np.take_along_axis(a, order, axis=1)
    m = a.shape[1]
    ranks = np.empty_like(a, dtype=float)
    for i in range(a.shape[0]):  # resamples: a few thousand rows of a vectorised tie pass each
        s = sorted_[i]
        starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
        ends = np.r_[starts[1:], m]
        avg = (starts + ends + 1) / 2  # ranks start+1 .. end, averaged
        ranks[i, order[i]] = np.repeat(avg, ends - starts)
    return ranks


def decimals(interval: Interval) -> int:
    """Places the interval supports: enough to show its width, one more than its first significant digit."""
    width = interval.high - interval.low
    if not width > 0:
        return 2
    return int(min(4, max(1, -math.floor(math.log10(width)) + 1)))


def verdict(ours: Interval, paper: float | None, *, min_n: int = MIN_N, max_half_width: float = MAX_HALF_WIDTH) -> str:
    """'n too small', 'undecided', 'reproduced', 'not reproduced (above)' or 'not reproduced (below)' — ours
    above or below the paper's number; '' without a paper number."""
    if paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return ""
    if ours.n < min_n:
        return "n too small"
    if ours.half_width > max_half_width:
        return "undecided"
    if paper in ours:
        return "reproduced"
    return "not reproduced (above)" if ours.low > paper else "not reproduced (below)"


def format_interval(i: Interval, places: int | None = None, sign: str = "") -> str:
    """'0.25 [0.11, 0.47] (n=20)'; sign='+': '+0.05 [-0.15, +0.25] (n=20)' (a difference)."""
    d = decimals(i) if places is None else places
    return f"{i.value:{sign}.{d}f} [{i.low:{sign}.{d}f}, {i.high:{sign}.{d}f}] (n={i.n})"


VERDICTS = ("reproduced", "not reproduced (above)", "not reproduced (below)", "undecided", "n too small")


def tally(verdicts) -> str:
    """'reproduced 9, not reproduced 4 (1 above, 3 below), undecided 3, n too small 1' (kinds with none left out;
    '' for no verdicts)."""
    counts = {v: 0 for v in VERDICTS}
    for v in verdicts:
        if v:
            counts[v] += 1
    above, below = counts["not reproduced (above)"], counts["not reproduced (below)"]
    parts = [f"reproduced {counts['reproduced']}"] if counts["reproduced"] else []
    if above + below:
        parts.append(f"not reproduced {above + below} ({above} above, {below} below)")
    parts += [f"{v} {counts[v]}" for v in ("undecided", "n too small") if counts[v]]
    return ", ".join(parts)


def needed(k: int, m: int, half_width: float) -> int:
    """Examples a cell with accuracy k/m needs for a Wilson half-width <= `half_width` at that accuracy."""
    p = min(max(k / m if m else 0.5, 0.02), 0.98)  # a cell at 0 or 1 still needs a finite n: take p near it
    n = max(m, 1)
    while wilson(round(p * n), n).half_width > half_width:
        n = math.ceil(n * 1.1) + 1
    return n


def cell_widths(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (attack, defense) accuracy cell of the rows (diverged rows, masking checks and the clean cells, whose
    n is the config's `limit`, left out): n, correct, and the Wilson half-width."""
    scored = rows[~rows["diverged"] & ~rows["attack"].map(is_check) & (rows["attack"] != "clean")]
    out = scored.groupby(["attack", "defense"], sort=False)["correct"].agg(n="size", k="sum").reset_index()
    out["half_width"] = [wilson(int(k), int(m)).half_width for k, m in zip(out["k"], out["n"], strict=True)]
    return out
