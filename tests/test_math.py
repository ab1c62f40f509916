"""Pure math of the aggregator: task vectors, similarity, grouping, weights."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.aggregation import (
    similarity_weights,
    size_weights,
    staleness_discount,
    uniform_weights,
)
from aggregator.grouping import (
    adjusted_rand_index,
    newcomer_group,
    relative_threshold,
    threshold_groups,
)
from aggregator.similarity import cosine, cosine_matrix, layerwise_cosine_matrices
from aggregator.task_vectors import (
    InvalidTaskVector,
    add_scaled,
    check_state_dict,
    flatten,
    layer_of,
    layers,
    shapes,
    task_vector,
    unflatten,
)
from workers.text_metrics import balanced_accuracy

P = "base_model.model."
Q = P + "bert.encoder.layer.0.attention.self.query"
V = P + "bert.encoder.layer.0.attention.self.value"
CLS = P + "classifier"


def make_sd(gen: torch.Generator, scale: float = 1.0, r: int = 4, h: int = 16) -> dict:
    return {
        f"{Q}.lora_A.weight": torch.randn(r, h, generator=gen) * scale,
        f"{Q}.lora_B.weight": torch.randn(h, r, generator=gen) * scale,
        f"{V}.lora_A.weight": torch.randn(r, h, generator=gen) * scale,
        f"{V}.lora_B.weight": torch.randn(h, r, generator=gen) * scale,
        f"{CLS}.weight": torch.randn(3, h, generator=gen) * scale,
        f"{CLS}.bias": torch.randn(3, generator=gen) * scale,
    }


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- keys and layers


def test_layer_of_lora_and_other_keys():
    assert layer_of(f"{Q}.lora_A.weight") == Q
    assert layer_of(f"{Q}.lora_B.weight") == Q
    assert layer_of(f"{CLS}.weight") == CLS
    assert layer_of(f"{CLS}.bias") == CLS
    assert layer_of(f"{Q}.lora_A.default.weight") == Q
    assert layer_of("scalar") == "scalar"


def test_layers_groups_and_sorts(gen):
    keys = list(make_sd(gen))[::-1]
    out = layers(keys)
    assert list(out) == sorted([Q, V, CLS])
    assert out[Q] == [f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"]
    assert out[CLS] == [f"{CLS}.bias", f"{CLS}.weight"]


# ---------------------------------------------------------------- validation


def test_check_state_dict_accepts_good(gen):
    sd = make_sd(gen)
    check_state_dict(sd, shapes(sd))


def test_check_state_dict_missing_key(gen):
    sd = make_sd(gen)
    expected = shapes(sd)
    del sd[f"{CLS}.bias"]
    with pytest.raises(InvalidTaskVector, match=r"missing.*classifier\.bias"):
        check_state_dict(sd, expected)


def test_check_state_dict_unexpected_key(gen):
    sd = make_sd(gen)
    expected = shapes(sd)
    sd["base_model.model.extra.weight"] = torch.zeros(2)
    with pytest.raises(InvalidTaskVector, match=r"unexpected.*extra\.weight"):
        check_state_dict(sd, expected)


def test_check_state_dict_wrong_shape(gen):
    sd = make_sd(gen)
    expected = shapes(sd)
    sd[f"{Q}.lora_A.weight"] = torch.zeros(5, 16)
    with pytest.raises(InvalidTaskVector) as e:
        check_state_dict(sd, expected)
    msg = str(e.value)
    assert f"{Q}.lora_A.weight" in msg and "(4, 16)" in msg and "(5, 16)" in msg


def test_check_state_dict_non_float(gen):
    sd = make_sd(gen)
    expected = shapes(sd)
    sd[f"{CLS}.bias"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InvalidTaskVector, match=r"classifier\.bias.*int64"):
        check_state_dict(sd, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_state_dict_nan_inf(gen, bad):
    sd = make_sd(gen)
    expected = shapes(sd)
    t = sd[f"{V}.lora_B.weight"].clone()
    t[0, 0] = bad
    t[1, 1] = bad
    sd[f"{V}.lora_B.weight"] = t
    with pytest.raises(InvalidTaskVector) as e:
        check_state_dict(sd, expected)
    msg = str(e.value)
    assert f"{V}.lora_B.weight" in msg
    assert ("2 NaN" in msg) if bad != bad else ("2 Inf" in msg)


# ---------------------------------------------------------------- arithmetic


def test_task_vector_and_add_scaled_round_trip(gen):
    base = make_sd(gen, scale=10.0)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    tau = task_vector(trained, base)
    assert all(t.dtype == torch.float32 for t in tau.values())
    back = add_scaled(base, [tau], [1.0])
    for k in base:
        torch.testing.assert_close(back[k], trained[k])
        assert back[k] is not base[k]


def test_task_vector_requires_same_keys(gen):
    base = make_sd(gen)
    trained = dict(base)
    del trained[f"{CLS}.weight"]
    with pytest.raises(InvalidTaskVector, match=r"classifier\.weight"):
        task_vector(trained, base)


def test_add_scaled_weighted_sum_and_no_mutation(gen):
    base = make_sd(gen)
    d1, d2 = make_sd(gen), make_sd(gen)
    snapshot = {k: v.clone() for k, v in base.items()}
    out = add_scaled(base, [d1, d2], [0.25, -2.0])
    for k in base:
        torch.testing.assert_close(out[k], base[k] + 0.25 * d1[k] - 2.0 * d2[k])
        assert torch.equal(base[k], snapshot[k])
    with pytest.raises(ValueError):
        add_scaled(base, [d1], [0.5, 0.5])


def test_flatten_unflatten_round_trip(gen):
    sd = make_sd(gen)
    vec = flatten(sd)
    assert vec.dim() == 1 and vec.dtype == torch.float32
    assert vec.numel() == sum(v.numel() for v in sd.values())
    # Fixed, sorted order: the first entries belong to the alphabetically first key.
    first = sorted(sd)[0]
    assert torch.equal(vec[: sd[first].numel()], sd[first].reshape(-1))
    # Insertion order of the dict must not matter.
    assert torch.equal(flatten(dict(reversed(list(sd.items())))), vec)
    back = unflatten(vec, sd)
    assert shapes(back) == shapes(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    with pytest.raises(InvalidTaskVector):
        unflatten(vec[:-1], sd)


# ---------------------------------------------------------------- similarity


def test_cosine_basic_and_zero():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(0.0)
    assert cosine(a, torch.zeros(3)) == 0.0
    assert cosine(torch.zeros(3), torch.zeros(3)) == 0.0


def test_cosine_matrix_diag_and_symmetry(gen):
    v = torch.randn(5, 40, generator=gen)
    v[2] = 0.0  # a client that did not move
    sim = cosine_matrix(v)
    assert sim.dtype == torch.float64 and sim.shape == (5, 5)
    assert torch.equal(torch.diagonal(sim), torch.ones(5, dtype=torch.float64))
    assert torch.equal(sim, sim.T)
    assert torch.equal(sim[2, [0, 1, 3, 4]], torch.zeros(4, dtype=torch.float64))
    assert sim[0, 1].item() == pytest.approx(cosine(v[0], v[1]), abs=1e-12)


def test_raw_parameters_vs_task_vectors(gen):
    """The FedBip argument: the shared base dominates raw-parameter cosine."""
    base = make_sd(gen, scale=10.0)
    d = flatten(base).numel()
    t1 = torch.randn(d, generator=gen, dtype=torch.float64)
    t2 = torch.randn(d, generator=gen, dtype=torch.float64)
    t2 -= (t2 @ t1) / (t1 @ t1) * t1  # exactly orthogonal task directions
    t2 += 0.1 * t1  # "orthogonal-ish"
    tau1 = unflatten((0.05 * t1).float(), base)
    tau2 = unflatten((0.05 * t2).float(), base)
    theta1 = add_scaled(base, [tau1], [1.0])
    theta2 = add_scaled(base, [tau2], [1.0])
    raw = cosine(flatten(theta1), flatten(theta2))
    tv = cosine(flatten(task_vector(theta1, base)), flatten(task_vector(theta2, base)))
    assert raw > 0.99
    assert tv < 0.3


def test_layerwise_cosine_differs_per_layer(gen):
    a = make_sd(gen)
    b = {k: (v if k.startswith(Q) else -v) for k, v in a.items()}
    mats = layerwise_cosine_matrices([a, b])
    assert set(mats) == {Q, V, CLS}
    assert mats[Q][0, 1].item() == pytest.approx(1.0)
    assert mats[V][0, 1].item() == pytest.approx(-1.0)
    assert mats[CLS][0, 1].item() == pytest.approx(-1.0)
    for m in mats.values():
        assert torch.equal(torch.diagonal(m), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------- weights


def test_similarity_weights_sum_to_one_and_clip_negative():
    row = torch.tensor([0.3, 0.9, -0.5, 0.6])
    p = similarity_weights(row, 1)
    assert p.dtype == torch.float64
    assert p.sum().item() == pytest.approx(1.0)
    assert p[2].item() == 0.0
    torch.testing.assert_close(p, torch.tensor([0.3, 1.0, 0.0, 0.6], dtype=torch.float64) / 1.9)


def test_similarity_weights_self_forced_to_one():
    # Even if the diagonal is garbage, the client counts fully for itself.
    p = similarity_weights(torch.tensor([0.0, 0.5]), 0)
    torch.testing.assert_close(p, torch.tensor([1 / 1.5, 0.5 / 1.5], dtype=torch.float64))


def test_no_similar_peers_keeps_own_update(gen):
    p = similarity_weights(torch.tensor([-0.2, 1.0, 0.0, -1.0]), 1)
    assert torch.equal(p, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    base = make_sd(gen)
    taus = [make_sd(gen) for _ in range(4)]
    out = add_scaled(base, taus, p.tolist())
    for k in base:
        assert torch.equal(out[k], base[k] + taus[1][k])


def test_staleness_discount_lowers_stale_peer():
    assert staleness_discount(0, 0.5) == 1.0
    assert staleness_discount(3, 0.5) == pytest.approx(0.5)
    assert staleness_discount(5, 0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_discount(-1, 0.5)
    row = torch.tensor([1.0, 0.8, 0.8])
    fresh = similarity_weights(row, 0)
    disc = torch.tensor([staleness_discount(s, 0.5) for s in (7, 0, 3)], dtype=torch.float64)
    stale = similarity_weights(row, 0, disc)
    assert stale[2] < fresh[2]
    assert stale[2] < stale[1]
    assert stale.sum().item() == pytest.approx(1.0)
    # The target's own (possibly stale) discount is ignored.
    assert stale[0] > fresh[0]


def test_uniform_and_size_weights():
    torch.testing.assert_close(uniform_weights(4), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(
        size_weights([10, 30, 60]), torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    )
    with pytest.raises(ValueError):
        uniform_weights(0)
    with pytest.raises(ValueError):
        size_weights([0, 0])


# ---------------------------------------------------------------- grouping


def _two_blocks(gen: torch.Generator) -> torch.Tensor:
    d = 64
    a = torch.randn(d, generator=gen)
    b = torch.randn(d, generator=gen)
    b -= (b @ a) / (a @ a) * a
    # Interleave the tasks so the labels' canonical order is actually exercised.
    tasks = [a, b, a, b, a, b]
    vecs = torch.stack([t + 0.3 * t.norm() / d**0.5 * torch.randn(d, generator=gen) for t in tasks])
    return cosine_matrix(vecs)


def test_threshold_groups_planted_blocks(gen):
    sim = _two_blocks(gen)
    assert threshold_groups(sim, 0.5) == [0, 1, 0, 1, 0, 1]


def test_threshold_groups_extremes(gen):
    sim = _two_blocks(gen)
    assert threshold_groups(sim, -1.0) == [0] * 6
    assert threshold_groups(sim, 1.01) == list(range(6))
    assert threshold_groups(torch.zeros((0, 0)), 0.1) == []
    assert threshold_groups(torch.ones((1, 1)), 0.1) == [0]


def test_threshold_groups_average_linkage_no_chaining():
    # 0~1 and 1~2 are similar but 0 and 2 are opposed: average linkage keeps 2 out.
    sim = torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.5], [-0.9, 0.5, 1.0]], dtype=torch.float64)
    assert threshold_groups(sim, 0.1) == [0, 0, 1]


def test_threshold_groups_deterministic_ties():
    sim = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]], dtype=torch.float64)
    assert threshold_groups(sim, 0.6) == [0, 1, 2]
    assert threshold_groups(sim, 0.5) == [0, 0, 0]


def test_smoothed_similarity_remembers_and_keeps_unchanged_pairs():
    from aggregator.similarity import smoothed_similarity

    nan = float("nan")
    now = torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    prev = torch.tensor([[1.0, 0.5, nan], [0.5, 1.0, 0.2], [nan, 0.2, 1.0]], dtype=torch.float64)
    unchanged = torch.zeros(3, 3, dtype=torch.bool)
    unchanged[1, 2] = unchanged[2, 1] = True
    out = smoothed_similarity(now, prev, unchanged, 0.75)
    assert out[0, 1] == pytest.approx(0.75 * 0.5 + 0.25 * 0.1)  # blended
    assert out[0, 2] == pytest.approx(0.0)  # no history: the new cosine
    assert out[1, 2] == pytest.approx(0.2)  # nothing new: kept
    assert torch.equal(out, out.T) and torch.all(out.diagonal() == 1)
    assert torch.equal(smoothed_similarity(now, prev, unchanged, 0.0)[0, 1:2], now[0, 1:2])
    with pytest.raises(ValueError):
        smoothed_similarity(now, prev, unchanged, 1.0)


def test_state_dict_norm_is_the_norm_of_the_flattened_vector():
    from aggregator.task_vectors import flatten, norm

    g = torch.Generator().manual_seed(3)
    sd = {"b": torch.randn(3, 4, generator=g), "a": torch.randn(5, generator=g)}
    assert norm(sd) == pytest.approx(float(flatten(sd).double().norm()), rel=1e-9)
    assert norm({}) == 0.0


def test_relative_threshold_follows_the_observed_spread():
    # 6 clients, 3 same-task pairs at 0.12 and unrelated pairs around 0 ± 0.01:
    # a fixed 0.2 groups nothing, the relative threshold finds the pairs
    n = 6
    sim = torch.zeros((n, n), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn((n, n), generator=gen, dtype=torch.float64)
    sim += (noise + noise.T) / 2
    for a, b in ((0, 1), (2, 3), (4, 5)):
        sim[a, b] = sim[b, a] = 0.12
    sim.fill_diagonal_(1.0)
    assert threshold_groups(sim, 0.2) == list(range(n))
    t = relative_threshold(sim, 3.0)
    assert 0.0 < t < 0.12
    assert threshold_groups(sim, t) == [0, 0, 1, 1, 2, 2]
    # scaled similarities (a later round): the same z gives the same groups
    scaled = sim * 3
    scaled.fill_diagonal_(1.0)
    assert threshold_groups(scaled, relative_threshold(scaled, 3.0)) == [0, 0, 1, 1, 2, 2]
    assert relative_threshold(torch.ones((1, 1)), 2.0) == math.inf
    with pytest.raises(ValueError, match="finite"):
        relative_threshold(sim, math.nan)


def test_a_newcomer_joins_the_group_whose_affinity_stands_out():
    # the demo's measured row: 6 same-task peers (one group) at 0.44-0.48, 6 others in
    # four groups at 0.01-0.05
    affinity = dict(enumerate([0.476, 0.442, 0.483, 0.446, 0.460, 0.457]))
    affinity.update({6: 0.026, 7: 0.050, 8: 0.014, 9: 0.019, 10: 0.019, 11: 0.050})
    groups = {k: 0 for k in range(6)} | {6: 1, 7: 2, 8: 3, 9: 4, 10: 4, 11: 2}
    assert newcomer_group(affinity, groups) == 0
    # the same peers split in two groups: the better one, its rivals counted as "others"
    # (robust statistics: two high values among eight do not hide it)
    split = groups | {3: 5, 4: 5, 5: 5}
    assert newcomer_group(affinity, split) in (0, 5)
    # a newcomer of a task no one has: noise everywhere, nothing stands out
    gen = torch.Generator().manual_seed(1)
    noise = (0.03 + 0.01 * torch.randn(12, generator=gen, dtype=torch.float64)).tolist()
    assert newcomer_group(dict(enumerate(noise)), groups) is None
    # never a group it points away from, never an empty or NaN one
    assert newcomer_group({0: -0.3, 1: -0.5, 2: -0.4, 3: -0.6}, {0: 0, 1: 1, 2: 2, 3: 3}) is None
    assert newcomer_group({}, {}) is None
    assert newcomer_group({0: math.nan, 1: 0.1}, {0: 0, 1: 0}) is None
    # too few others to measure a spread: the best group must beat each of them
    assert newcomer_group({0: 0.4}, {0: 0}) == 0
    assert newcomer_group({0: 0.4, 1: 0.1, 2: 0.05}, {0: 0, 1: 1, 2: 2}) == 0
    assert newcomer_group({0: 0.4, 1: 0.1, 2: 0.45}, {0: 0, 1: 0, 2: 1}) == 1
    # peers without a group label are not counted
    assert newcomer_group({0: 0.4, 9: 0.9}, {0: 0}) == 0


def test_adjusted_rand_index_by_hand():
    assert adjusted_rand_index([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert adjusted_rand_index([5, 5, 2, 2], [0, 0, 1, 1]) == 1.0  # names do not matter
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)
    # sklearn.metrics.adjusted_rand_score([0,0,0,1,1,1], [0,0,1,1,2,2]) = 0.242424...
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    assert adjusted_rand_index([0, 1, 2], ["a", "b", "c"]) == 1.0  # all apart, both
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0])


def test_balanced_accuracy_by_hand():
    # gold: answer 0 six times, answer 1 twice; always answering 0 is 75 % accurate
    gold = [0, 0, 0, 0, 0, 0, 1, 1]
    assert balanced_accuracy([0] * 8, gold) == pytest.approx(0.5)
    # recall 4/6 on answer 0, 1/2 on answer 1
    predicted = [0, 0, 0, 0, 1, 1, 1, 0]
    assert balanced_accuracy(predicted, gold) == pytest.approx((4 / 6 + 1 / 2) / 2)
    assert balanced_accuracy([2, 2], [2, 2]) == 1.0
    assert balanced_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        balanced_accuracy([0], [0, 1])
