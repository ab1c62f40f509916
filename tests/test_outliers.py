"""Screening of poisoned / outlier updates (aggregator/outliers.py): pure functions."""

from __future__ import annotations

import pytest
import torch

from aggregator import outliers
from aggregator.outliers import (
    MIN_PEERS,
    NORM_OUTLIER,
    SIGN_FLIPPED,
    anti_aligned,
    check_settings,
    flip_outlier,
    norm_outlier,
    screen,
    sign_flipped,
)
from services import metrics


def vec(seed: int, d: int = 256, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(d, generator=torch.Generator().manual_seed(seed))


def honest(n: int = 10) -> dict[int, torch.Tensor]:
    return {i: vec(100 + i) for i in range(n)}


def test_reasons_are_the_metric_labels():
    assert outliers.REASONS == metrics.QUARANTINE_REASONS == (NORM_OUTLIER, SIGN_FLIPPED)


def test_norm_outlier_above_ratio_times_median():
    peers = [1.0, 1.1, 0.9, 1.2, 5.0]  # median 1.1: one large peer does not move it
    assert norm_outlier(10.9, peers, 10.0) is None
    found = norm_outlier(11.5, peers, 10.0)
    assert found is not None and found.reason == NORM_OUTLIER
    assert "10.5x the median 1.1 of 5 other clients" in found.message


def test_norm_outlier_needs_min_peers():
    few = [1.0] * (MIN_PEERS - 1)
    assert norm_outlier(1000.0, few, 10.0) is None
    assert norm_outlier(1000.0, few + [1.0], 10.0) is not None
    assert norm_outlier(1000.0, [], 10.0, min_peers=0) is None  # nobody to compare with
    assert norm_outlier(1000.0, [1.0], 10.0, min_peers=1) is not None


def test_norm_outlier_zero_vectors_and_off():
    # peers that did not move give no scale: nothing is an outlier against them
    assert norm_outlier(5.0, [0.0, 0.0, 0.0], 10.0) is None
    # a zero update is never too large
    assert norm_outlier(0.0, [1.0, 1.0, 1.0], 10.0) is None
    assert norm_outlier(1e9, [1.0, 1.0, 1.0], 0.0) is None  # 0: off


def test_exact_flipped_copy_is_found_and_names_the_peer():
    peers = honest()
    found = sign_flipped(-peers[3], peers.items(), 0.95)
    assert found is not None and found.reason == SIGN_FLIPPED
    assert "client 3's" in found.message and "cosine -1.0000" in found.message


def test_flipped_copy_far_outside_the_norm_band_is_left_to_the_norm_check():
    peers = honest()
    # a scaled flipped copy: not "a copy" by norm, but the norm check catches it
    assert sign_flipped(-5 * peers[3], peers.items(), 0.95) is None
    assert sign_flipped(-1.9 * peers[3], peers.items(), 0.95) is not None
    assert sign_flipped(-0.6 * peers[3], peers.items(), 0.95) is not None
    found = screen(-50 * peers[3], peers.items(), norm_ratio=10.0, flip_cosine=0.95)
    assert found is not None and found.reason == NORM_OUTLIER


def test_scaled_copy_is_a_norm_outlier_not_a_flip():
    peers = honest()
    found = screen(50 * peers[2], peers.items(), norm_ratio=10.0, flip_cosine=0.95)
    assert found is not None and found.reason == NORM_OUTLIER
    # a plain copy at the same scale is neither (a copy adds nothing, but harms nobody)
    assert screen(peers[2].clone(), peers.items(), norm_ratio=10.0, flip_cosine=0.95) is None


def test_honest_updates_pass():
    peers = honest()
    for seed in range(20):
        tau = vec(1000 + seed, scale=1.0 + seed / 10)  # up to 3x the others' norm
        assert screen(tau, peers.items(), norm_ratio=10.0, flip_cosine=0.95) is None


def test_zero_vectors_are_never_flipped_copies():
    peers = {**honest(3), 99: torch.zeros(256)}
    assert sign_flipped(torch.zeros(256), peers.items(), 0.95) is None
    assert sign_flipped(-peers[0], {99: torch.zeros(256)}.items(), 0.95) is None
    assert screen(torch.zeros(256), peers.items(), norm_ratio=10.0, flip_cosine=0.95) is None


def test_partial_flip_and_threshold():
    peers = honest()
    # cosine of -(x + 0.5 y) with x, y unrelated: about -0.89, not a copy at 0.95
    near = -(peers[0] + 0.5 * vec(7))
    assert sign_flipped(near, peers.items(), 0.95) is None
    assert sign_flipped(near, peers.items(), 0.8) is not None
    assert sign_flipped(-peers[0], peers.items(), 0.0) is None  # 0: off


def test_flip_from_numbers_and_lazy_peers():
    assert flip_outlier(1.0, [("a", -0.99, 1.0)], 0.95).reason == SIGN_FLIPPED
    assert flip_outlier(1.0, [("a", -0.94, 1.0)], 0.95) is None
    assert flip_outlier(1.0, [("a", -1.0, 3.0)], 0.95) is None  # not the same scale
    assert flip_outlier(0.0, [("a", -1.0, 0.0)], 0.95) is None
    seen = []

    def peers():
        for i, v in honest().items():
            seen.append(i)
            yield i, v

    found = sign_flipped(-honest()[2], peers(), 0.95)
    assert found is not None and seen == [0, 1, 2]  # stops at the first match


def test_screen_uses_given_norms_for_the_median():
    peers = honest()
    tau = vec(5, scale=3.0)  # norm ≈ 48
    assert screen(tau, [], norm_ratio=10.0, flip_cosine=0.95, peer_norms=[16.0] * 5) is None
    found = screen(tau, [], norm_ratio=10.0, flip_cosine=0.95, peer_norms=[1.0] * 5)
    assert found is not None and found.reason == NORM_OUTLIER
    assert screen(50 * peers[0], peers.items(), norm_ratio=0.0, flip_cosine=0.0) is None


def test_anti_aligned_picks_the_most_opposed_within_slack():
    row = torch.tensor([1.0, -0.99, 0.2, -0.86, -0.5, -1.0, -0.84])
    assert anti_aligned(row, 0.95) == [5, 1, 3]  # <= -0.85, most opposed first
    assert anti_aligned(row, 0.95, limit=2) == [5, 1]
    assert anti_aligned(row, 0.95, slack=0.0) == [5, 1]
    assert anti_aligned(row, 0.0) == []
    assert anti_aligned(torch.zeros(0), 0.95) == []


@pytest.mark.parametrize(
    "ratio, flip", [(0.5, 0.95), (1.0, 0.95), (-1.0, 0.95), (float("nan"), 0.95), (10, 1.5)]
)
def test_settings_that_would_quarantine_honest_updates_are_refused(ratio, flip):
    with pytest.raises(ValueError, match="FEDVEC_OUTLIER"):
        check_settings(ratio, flip)


def test_off_and_defaults_are_valid_settings():
    check_settings(0.0, 0.0)
    check_settings(10.0, 0.95)
    check_settings(1.5, 1.0)


def test_quarantine_counters_start_at_zero():
    from prometheus_client import REGISTRY

    for reason in outliers.REASONS:
        sample = REGISTRY.get_sample_value("fedvec_updates_quarantined_total", {"reason": reason})
        assert sample is not None


def _scores(tau: torch.Tensor, peers: dict[int, torch.Tensor]) -> list[tuple[int, float, float]]:
    return [
        (k, float(torch.nn.functional.cosine_similarity(tau, v, dim=0)), float(v.norm()))
        for k, v in peers.items()
    ]


def test_screen_with_precomputed_flip_scores_agrees_with_the_vectors():
    peers = honest()
    norms = [float(v.norm()) for v in peers.values()]
    for tau in (-peers[4], 50 * peers[2], vec(555), peers[1].clone()):
        by_vectors = screen(tau, peers.items(), norm_ratio=10.0, flip_cosine=0.95)
        by_scores = screen(
            tau,
            (),
            norm_ratio=10.0,
            flip_cosine=0.95,
            peer_norms=norms,
            flip_scores=_scores(tau, peers),
        )
        assert (by_vectors and by_vectors.reason) == (by_scores and by_scores.reason)
        if by_vectors is not None:
            assert by_vectors.message == by_scores.message


def test_screen_reads_peers_lazily_when_the_norms_are_given():
    peers = honest()
    norms = [float(v.norm()) for v in peers.values()]
    read: list[int] = []

    def lazily():
        for k, v in peers.items():
            read.append(k)
            yield k, v

    # the norm check flags it: no peer vector is read at all
    found = screen(50 * peers[2], lazily(), norm_ratio=10.0, flip_cosine=0.95, peer_norms=norms)
    assert found is not None and found.reason == NORM_OUTLIER and read == []
    # a flipped copy of client 3: reading stops at the match
    found = screen(-peers[3], lazily(), norm_ratio=10.0, flip_cosine=0.95, peer_norms=norms)
    assert found is not None and found.reason == SIGN_FLIPPED and read == [0, 1, 2, 3]
