"""The measures of serving vs training drift: pure functions on counts (numpy only).

The two distribution distances are TensorFlow Data Validation's, the ones its
`FeatureComparator` (tensorflow_metadata schema.proto: `infinity_norm`,
`jensen_shannon_divergence`) applies in training-serving skew and drift
detection (https://www.tensorflow.org/tfx/guide/tfdv#skewdetect):

- numeric features: the Jensen-Shannon divergence between two histograms on
  the same bins (`jensen_shannon_divergence`), log base 2, so 0 (the same
  distribution) .. 1 (no bin in common);
- string features: the L-infinity distance between the normalized value
  frequencies (`l_infinity_distance`): the largest difference in the share of
  any one value, 0 .. 1.

Training is summarized by stats.json (a 20-bin histogram, value counts or the
top values); serving arrives as rows, binned here on training's edges with one
underflow and one overflow bin beside them (`bin_on_edges`), where training has
0. Missing values are excluded from both distributions and reported apart, as
shares (`share`), with the share of empty windows and of values training never
saw (`oov_share`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np

OTHER = "__other__"  # the bucket of every value outside training's top values, when training lists only those


def share(part: float, total: float) -> Optional[float]:
    """part / total, or None when there is nothing to share (total 0)."""
    return None if total == 0 else float(part) / float(total)


def normalized(counts: Sequence[float]) -> np.ndarray:
    """Counts -> frequencies summing to 1. Raises ValueError on negative counts or on a total of 0
    (no distribution to compare)."""
    counts = np.asarray(counts, dtype=float)
    if (counts < 0).any():
        raise ValueError(f"counts must not be negative, got {counts.tolist()}")
    total = counts.sum()
    if total == 0:
        raise ValueError("no values: a distribution needs a positive total count")
    return counts / total


def entropy_bits(frequencies: np.ndarray) -> float:
    """Shannon entropy in bits, 0 log 0 taken as 0."""
    nonzero = frequencies[frequencies > 0]
    return float(-(nonzero * np.log2(nonzero)).sum())


def jensen_shannon_divergence(p_counts: Sequence[float], q_counts: Sequence[float]) -> float:
    """The Jensen-Shannon divergence of two histograms over the same bins, in bits:
    JSD(P, Q) = H(M) - (H(P) + H(Q)) / 2 with M = (P + Q) / 2, H the entropy in
    log base 2, so 0 for the same distribution and 1 for disjoint ones. Counts
    are normalized first. TFDV's measure for numeric features (and optionally
    categorical ones): https://www.tensorflow.org/tfx/guide/tfdv#skewdetect.

    Raises ValueError when the bins differ in number or either side has no values."""
    p, q = normalized(p_counts), normalized(q_counts)
    if p.shape != q.shape:
        raise ValueError(f"the histograms must share their bins: {p.size} and {q.size} bins")
    m = (p + q) / 2
    divergence = entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2
    return float(min(max(divergence, 0.0), 1.0))  # rounding can step a hair outside [0, 1]


def l_infinity_distance(p_counts: Mapping[str, float], q_counts: Mapping[str, float]) -> float:
    """max over values v of |P(v) - Q(v)|, P and Q the value counts normalized
    (a value absent on one side has share 0 there): TFDV's `infinity_norm`,
    its default measure for categorical features
    (https://www.tensorflow.org/tfx/guide/tfdv#skewdetect). 0 for the same
    frequencies, 1 for disjoint values.

    Raises ValueError when either side has no values."""
    values = sorted(set(p_counts) | set(q_counts))
    p = normalized([p_counts.get(v, 0) for v in values])
    q = normalized([q_counts.get(v, 0) for v in values])
    return float(np.abs(p - q).max())


def bin_on_edges(values: Iterable[float], edges: Sequence[float]) -> np.ndarray:
    """Values -> counts on training's histogram edges with an underflow and an
    overflow bin around them: len(edges) + 1 counts,
    [below edges[0], [e0, e1), [e1, e2), ..., [e_n-1, e_n], above edges[-1]]
    (numpy.histogram's bins: the last one includes its upper edge).

    Raises ValueError on edges that are not sorted or fewer than 2."""
    edges = np.asarray(edges, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or (np.diff(edges) < 0).any():
        raise ValueError(f"histogram edges must be at least 2 sorted numbers, got {edges.tolist()}")
    values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    bins = edges.size - 1
    index = np.searchsorted(edges, values, side="right")  # 0: below edges[0]; 1..bins: inside; bins + 1: above
    index[values == edges[-1]] = bins  # the last bin is closed
    return np.bincount(index, minlength=bins + 2).astype(np.int64)


def with_tails(training_counts: Sequence[int]) -> np.ndarray:
    """Training's histogram counts with the two empty tail bins `bin_on_edges` adds."""
    return np.concatenate([[0], np.asarray(training_counts, dtype=np.int64), [0]])


def training_value_counts(present: int, top: Sequence[Mapping], values: Optional[Mapping[str, int]],
                          values_complete: bool) -> tuple[dict[str, int], bool]:
    """Training's string value counts as stats.json gives them -> (counts,
    complete). Complete: every value (`values` when `values_complete`). Otherwise
    the top values and one OTHER bucket holding the rest of `present`."""
    if values_complete and values is not None:
        return {str(v): int(c) for v, c in values.items() if c}, True
    counts = {str(item["value"]): int(item["count"]) for item in top}
    rest = present - sum(counts.values())
    if rest > 0:
        counts[OTHER] = rest
    return counts, False


def lump_into(served_counts: Mapping[str, int], categories: Iterable[str]) -> dict[str, int]:
    """Served value counts -> counts over `categories` (training's top values)
    and OTHER for every other value, to compare with an incomplete training list."""
    categories = set(categories) - {OTHER}
    lumped: dict[str, int] = {}
    for value, count in served_counts.items():
        key = value if value in categories else OTHER
        lumped[key] = lumped.get(key, 0) + count
    return lumped


def oov_share(served_counts: Mapping[str, int], training_values: Iterable[str]) -> Optional[float]:
    """The share of served (present) values that training never saw; None when nothing was served."""
    known = set(training_values)
    total = sum(served_counts.values())
    unseen = sum(count for value, count in served_counts.items() if value not in known)
    return share(unseen, total)
