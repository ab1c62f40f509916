"""Screening of poisoned or outlier updates: pure functions over tensors and numbers, no I/O.

Poisoning and model-replacement attacks work in one of two ways on an update that the server
averages: they scale it (a norm many times an honest client's outweighs everyone else in any
weighted mean), or they send an honest client's task vector with its sign flipped (added
to the mean it cancels that client's work). Both are visible from the update alone next to
the other clients' latest accepted updates: (a) its norm is far above their median, (b) it
points almost exactly opposite one of them at about the same norm. An update flagged by
either is quarantined by the aggregator: kept, but never aggregated.

Labels (`NORM_OUTLIER`, `SIGN_FLIPPED`) are bounded: they are metric labels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import torch

from aggregator.similarity import cosine

NORM_OUTLIER = "norm_outlier"
SIGN_FLIPPED = "sign_flipped"
REASONS = (NORM_OUTLIER, SIGN_FLIPPED)

# Below this many peers the median says little about what an honest norm is, and a small
# federation (or the first clients of a new one) must not be blocked by it.
MIN_PEERS = 3
# A sign-flipped copy keeps the copied update's norm; two honest but opposed tasks need not
# have similar norms, and the norm check handles a flipped copy that was also scaled up.
FLIP_NORM_BAND = (0.5, 2.0)
# Sketch cosines estimate exact ones (aggregator/sketch.py: tiny errors near ±1); a sketch
# row is searched this much past the threshold for candidates, which are then checked exactly.
SKETCH_SLACK = 0.1
SKETCH_CANDIDATES = 8


class Outlier(NamedTuple):
    reason: str  # NORM_OUTLIER | SIGN_FLIPPED
    message: str  # for logs and the update's row


def check_settings(norm_ratio: float, flip_cosine: float) -> None:
    """ValueError for settings that would quarantine honest updates or mean nothing."""
    if not math.isfinite(norm_ratio) or (norm_ratio != 0 and norm_ratio <= 1):
        raise ValueError(
            f"FEDVEC_OUTLIER_NORM_RATIO must be 0 (off) or > 1, got {norm_ratio}: "
            "at <= 1 about half of the honest clients exceed it"
        )
    if not 0 <= flip_cosine <= 1:
        raise ValueError(
            f"FEDVEC_OUTLIER_FLIP_COSINE must be in [0, 1] (0: off), got {flip_cosine}"
        )


def vector_norm(tau: torch.Tensor) -> float:
    """L2 norm in float64 (float32 sums over millions of entries lose digits)."""
    return float(torch.linalg.vector_norm(tau.detach().reshape(-1), dtype=torch.float64))


def in_flip_band(norm: float, peer_norm: float, band: tuple[float, float] = FLIP_NORM_BAND) -> bool:
    """Whether `norm` is within band[0]..band[1] times `peer_norm` (a copy's scale)."""
    return peer_norm > 0 and band[0] * peer_norm <= norm <= band[1] * peer_norm


def norm_outlier(
    norm: float, peer_norms: Sequence[float], ratio: float, min_peers: int = MIN_PEERS
) -> Outlier | None:
    """(a) norm > ratio × median of the peers' norms: a scaled (boosted) update.

    ratio 0: off. Fewer than min_peers peers, or a median of 0 (peers that did not move give
    no scale to compare with): never an outlier."""
    if ratio <= 0 or len(peer_norms) < max(1, min_peers):
        return None
    median = float(statistics.median(peer_norms))
    if not median > 0 or not norm > ratio * median:
        return None
    return Outlier(
        NORM_OUTLIER,
        f"task vector norm {norm:.4g} is {norm / median:.1f}x the median {median:.4g} of "
        f"{len(peer_norms)} other clients' latest updates (limit {ratio:g}x)",
    )


def flip_outlier(
    norm: float,
    peers: Iterable[tuple[Hashable, float, float]],
    flip_cosine: float,
    band: tuple[float, float] = FLIP_NORM_BAND,
) -> Outlier | None:
    """(b) from precomputed numbers: peers yields (peer, cosine with it, its norm); the first
    peer with cosine <= -flip_cosine at a norm within band makes the update a sign-flipped
    copy of that peer's. flip_cosine 0: off."""
    if flip_cosine <= 0 or not norm > 0:
        return None
    for peer, cos, peer_norm in peers:
        if cos <= -flip_cosine and in_flip_band(norm, peer_norm, band):
            return Outlier(
                SIGN_FLIPPED,
                f"task vector is a sign-flipped copy of client {peer}'s latest update "
                f"(cosine {cos:.4f}, norm {norm:.4g} vs {peer_norm:.4g})",
            )
    return None


def sign_flipped(
    tau: torch.Tensor,
    peers: Iterable[tuple[Hashable, torch.Tensor]],
    flip_cosine: float,
    band: tuple[float, float] = FLIP_NORM_BAND,
) -> Outlier | None:
    """(b) from vectors: tau and peers' flat task vectors, (peer, vector) pairs. Peers are
    read one at a time and the search stops at the first match, so a caller may load them
    lazily. A zero vector is never a flipped copy (its cosine with anything is 0)."""
    if flip_cosine <= 0:
        return None
    norm = vector_norm(tau)

    def scores() -> Iterable[tuple[Hashable, float, float]]:
        for peer, vec in peers:
            yield peer, cosine(tau, vec), vector_norm(vec)

    return flip_outlier(norm, scores(), flip_cosine, band)


def screen(
    tau: torch.Tensor,
    peers: Iterable[tuple[Hashable, torch.Tensor]],
    *,
    norm_ratio: float,
    flip_cosine: float,
    peer_norms: Sequence[float] | None = None,
    flip_scores: Iterable[tuple[Hashable, float, float]] | None = None,
    min_peers: int = MIN_PEERS,
) -> Outlier | None:
    """Both checks on a new update's flat τ against the other clients' latest accepted
    updates: norm first (peer_norms, or the norms of `peers` when not given), then sign flip
    against `peers`, or against flip_scores when given: (peer, cosine with tau, its norm)
    already computed (a cosine matrix's row), as flip_outlier takes them. None: the update
    may be aggregated. With peer_norms given, `peers` (or flip_scores) is read lazily: not
    at all when the norm check flags the update, then only up to the first match."""
    if peer_norms is None:
        peers = list(peers)
        peer_norms = [vector_norm(v) for _, v in peers]
    norm = vector_norm(tau)
    found = norm_outlier(norm, list(peer_norms), norm_ratio, min_peers)
    if found is not None:
        return found
    if flip_scores is not None:
        return flip_outlier(norm, flip_scores, flip_cosine)
    return sign_flipped(tau, peers, flip_cosine)


def anti_aligned(
    similarity: torch.Tensor,
    flip_cosine: float,
    *,
    slack: float = SKETCH_SLACK,
    limit: int = SKETCH_CANDIDATES,
) -> list[int]:
    """Positions in an estimated (sketch) similarity row that may be sign-flipped partners:
    estimate <= -flip_cosine + slack, the most opposed first, at most `limit`. One pass over
    the row; the exact check then reads only these few vectors."""
    if flip_cosine <= 0 or limit <= 0 or similarity.numel() == 0:
        return []
    row = similarity.detach().reshape(-1)
    hits = (row <= -flip_cosine + slack).nonzero().reshape(-1)
    if hits.numel() == 0:
        return []
    order = torch.argsort(row[hits].to(torch.float64), stable=True)[:limit]
    return [int(hits[i]) for i in order]
