"""Grouping clients by similarity: agglomerative clustering with average linkage."""

from __future__ import annotations

import math

import torch


def threshold_groups(sim: torch.Tensor, threshold: float) -> list[int]:
    """Group labels from a similarity matrix.

    Start from singletons; repeatedly merge the two clusters with the highest average pairwise
    similarity while that average is >= threshold. Average linkage (not single) so one
    borderline pair cannot chain two unrelated tasks together. Ties go to the pair whose
    lowest members come first, so the result is deterministic. Labels are canonical:
    0, 1, 2, ... in order of each group's lowest member index.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"threshold_groups: expected a square matrix, got {tuple(sim.shape)}")
    n = int(sim.shape[0])
    if n == 0:
        return []
    if math.isnan(threshold):
        raise ValueError("threshold_groups: threshold is NaN")
    s = sim.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("threshold_groups: similarity matrix has NaN/Inf entries")
    if threshold <= -1:
        return [0] * n
    s = (s + s.T) / 2  # linkage must not depend on the direction of a pair

    # clusters[i] = sorted members; total[a][b] = sum of s over member pairs (a, b).
    clusters: list[list[int]] = [[i] for i in range(n)]
    m = s.tolist()
    total: list[list[float]] = [row[:] for row in m]
    while len(clusters) > 1:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                avg = total[a][b] / (len(clusters[a]) * len(clusters[b]))
                if best is None or avg > best[0]:
                    best = (avg, a, b)
        assert best is not None
        avg, a, b = best
        if avg < threshold:
            break
        # Merge b into a; clusters stay ordered by lowest member because a < b.
        clusters[a] = sorted(clusters[a] + clusters[b])
        for c in range(len(clusters)):
            total[a][c] += total[b][c]
        for c in range(len(clusters)):
            total[c][a] = total[a][c]
        del clusters[b]
        del total[b]
        for row in total:
            del row[b]

    labels = [0] * n
    for label, members in enumerate(sorted(clusters, key=lambda c: c[0])):
        for i in members:
            labels[i] = label
    return labels


def _offdiagonal(sim: torch.Tensor) -> torch.Tensor:
    n = int(sim.shape[0])
    s = sim.detach().to(torch.float64)
    return s[~torch.eye(n, dtype=torch.bool)]


def relative_threshold(sim: torch.Tensor, z: float) -> float:
    """median + z · (1.4826 · MAD) of the off-diagonal similarities: a threshold that follows
    the observed distribution. Task vectors of unrelated clients are nearly orthogonal
    with a spread that changes round by round, so a fixed cosine groups unsteadily; pairs
    of one task stand out of the bulk by some robust standard deviations. With fewer than
    two clients (no pairs) +inf: nothing to merge."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"relative_threshold: expected a square matrix, got {tuple(sim.shape)}")
    if not math.isfinite(z):
        raise ValueError(f"relative_threshold: z must be finite, got {z}")
    values = _offdiagonal(sim)
    if values.numel() == 0:
        return math.inf
    median = float(values.median())
    mad = float((values - median).abs().median())
    return median + z * 1.4826 * mad


# A newcomer joins a group only if the group's affinity stands out of the other peers' by
# this many robust standard deviations: the usual outlier rule (3 MADs), fixed, not fitted.
NEWCOMER_STANDOUT = 3.0
# fewer peers outside the best group than this: no spread to measure
NEWCOMER_MIN_OTHERS = 3


def newcomer_group(
    affinity: dict[int, float], groups: dict[int, int], standout: float = NEWCOMER_STANDOUT
) -> int | None:
    """The group a newcomer joins, from its affinity with each peer that has a model (peer
    -> cosine of the newcomer's update with how far the peer's model has moved from the
    initial adapter) and the peers' group labels; None when no group stands out.

    Why not the similarity index: a newcomer's update starts from the initial adapter, its
    peers' latest updates from their trained models, and in the benchmarks the cosine
    between the two was noise (0.01-0.05 for same-task and other-task peers alike) while
    the cosine with the peers' displacement from the initial adapter told the tasks apart
    (0.44-0.48 against 0.01-0.05). The best group (highest mean affinity) is taken when its
    mean is positive and above median + standout * 1.4826 * MAD of the other peers'
    affinities (with fewer than NEWCOMER_MIN_OTHERS of them: above each)."""
    peers = [k for k in affinity if k in groups]
    if not peers:
        return None
    by_group: dict[int, list[float]] = {}
    for k in peers:
        by_group.setdefault(groups[k], []).append(float(affinity[k]))
    best = max(sorted(by_group), key=lambda g: sum(by_group[g]) / len(by_group[g]))
    mean = sum(by_group[best]) / len(by_group[best])
    others = torch.tensor(
        [float(affinity[k]) for k in peers if groups[k] != best], dtype=torch.float64
    )
    if not math.isfinite(mean) or mean <= 0:
        return None
    if others.numel() < NEWCOMER_MIN_OTHERS:  # too few to measure a spread: above them all
        return best if others.numel() == 0 or mean > float(others.max()) else None
    median = float(others.median())
    mad = float((others - median).abs().median())
    return best if mean > median + standout * 1.4826 * mad else None


def adjusted_rand_index(a: list, b: list) -> float:
    """Adjusted Rand index of two labellings of the same items (Hubert and Arabie): 1 when
    they agree up to renaming, about 0 for unrelated ones. 1.0 when both put every item in
    one group, or each item alone (nothing to disagree on)."""
    if len(a) != len(b):
        raise ValueError(f"adjusted_rand_index: {len(a)} labels against {len(b)}")

    def pairs(k: int) -> float:
        return k * (k - 1) / 2

    joint: dict[tuple, int] = {}
    for x, y in zip(a, b, strict=True):
        joint[(x, y)] = joint.get((x, y), 0) + 1
    rows: dict = {}
    cols: dict = {}
    for (x, y), k in joint.items():
        rows[x] = rows.get(x, 0) + k
        cols[y] = cols.get(y, 0) + k
    index = sum(pairs(k) for k in joint.values())
    sum_rows = sum(pairs(k) for k in rows.values())
    sum_cols = sum(pairs(k) for k in cols.values())
    total = pairs(len(a))
    if total == 0:
        return 1.0
    expected = sum_rows * sum_cols / total
    best = (sum_rows + sum_cols) / 2
    if best == expected:
        return 1.0
    return (index - expected) / (best - expected)
