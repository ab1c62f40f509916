"""Aggregation weights: similarity-based (with staleness discount), uniform, size-based."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def staleness_discount(staleness: int, exponent: float) -> float:
    """(1 + staleness) ** -exponent: an update computed against an older base counts less."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if not math.isfinite(exponent) or exponent < 0:
        # A negative exponent would reward staleness.
        raise ValueError(f"staleness exponent must be finite and >= 0, got {exponent}")
    return float((1 + staleness) ** -exponent)


def similarity_weights(
    sim_row: torch.Tensor, self_index: int, discounts: torch.Tensor | None = None
) -> torch.Tensor:
    """p_k = max(s_k, 0) d_k / sum_j max(s_j, 0) d_j, float64, sums to 1.

    s_self is forced to 1 and d_self to 1, so the denominator is >= 1 and a client with no
    similar peers gets p = one-hot on itself. Negative similarity is clipped to 0: an opposed
    task's update would pull the client away from its own task.
    """
    s = sim_row.detach().reshape(-1).to(torch.float64).clone()
    n = s.numel()
    if not 0 <= self_index < n:
        raise IndexError(f"self_index {self_index} out of range for {n} similarities")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("similarity row has NaN/Inf entries")
    if discounts is None:
        d = torch.ones(n, dtype=torch.float64)
    else:
        d = discounts.detach().reshape(-1).to(torch.float64).clone()
        if d.numel() != n:
            raise ValueError(f"{d.numel()} discounts for {n} similarities")
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError("discounts must be finite and >= 0")
    s[self_index] = 1.0
    d[self_index] = 1.0
    w = s.clamp(min=0.0) * d
    return w / w.sum()


def relative_similarity_weights(
    sim_row: torch.Tensor, self_index: int, discounts: torch.Tensor | None = None
) -> torch.Tensor:
    """similarity_weights with the client counted as its most similar peer, not as s = 1.

    Why: task vectors of short runs on little data are nearly orthogonal even within a task
    (cosines of .03-.15 at LoRA sizes), so with s_self = 1 a client keeps ~70-80 % of the
    weight whatever its group, and FedBip stays mostly local. Counting itself at its nearest
    peer's similarity makes the weights depend only on how similar the peers are relative
    to each other (scaling every cosine leaves them unchanged), as the relative grouping
    threshold does for the groups. No peer with a positive similarity: one-hot on itself."""
    s = sim_row.detach().reshape(-1).to(torch.float64).clamp(min=0.0)
    if not 0 <= self_index < s.numel():
        raise IndexError(f"self_index {self_index} out of range for {s.numel()} similarities")
    peers = torch.cat([s[:self_index], s[self_index + 1 :]])
    top = float(peers.max()) if peers.numel() else 0.0
    # similarity_weights counts the client at 1: after this scaling, its nearest peer's value
    return similarity_weights(s / top if top > 0 else s, self_index, discounts)


def uniform_weights(n: int) -> torch.Tensor:
    if n <= 0:
        raise ValueError(f"uniform_weights: n must be > 0, got {n}")
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def size_weights(num_examples: Sequence[int]) -> torch.Tensor:
    """n_k / sum n, float64 (FedAvg weighting)."""
    sizes = torch.tensor([float(k) for k in num_examples], dtype=torch.float64)
    if sizes.numel() == 0:
        raise ValueError("size_weights: no sizes given")
    if bool((sizes < 0).any()):
        raise ValueError(f"size_weights: negative example counts in {list(num_examples)}")
    total = sizes.sum()
    if total <= 0:
        raise ValueError("size_weights: total number of examples is 0")
    return sizes / total
