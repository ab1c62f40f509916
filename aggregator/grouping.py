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
