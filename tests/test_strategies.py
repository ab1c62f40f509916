"""Strategies on a small planted setup: 4 clients, 2 tasks x 2 clients."""

from __future__ import annotations

import pytest
import torch

from aggregator.aggregation import (
    relative_similarity_weights,
    similarity_weights,
    staleness_discount,
)
from aggregator.similarity import layerwise_cosine_matrices
from aggregator.strategies import (
    STRATEGIES,
    Contribution,
    Plan,
    Strategy,
    get_strategy,
)
from aggregator.task_vectors import (
    InvalidTaskVector,
    add_scaled,
    flatten,
    layers,
    shapes,
    unflatten,
)
from tests.test_math import CLS, Q, make_sd

TASK = [0, 0, 1, 1]  # planted: clients 0,1 do task A; clients 2,3 do task B
SIZES = [10, 30, 20, 40]


def contribution(cid: int, base: dict, tau: dict, n: int, staleness: int = 0) -> Contribution:
    return Contribution(
        client_id=cid,
        task_vector=tau,
        trained=add_scaled(base, [tau], [1.0]),
        num_examples=n,
        staleness=staleness,
    )


@pytest.fixture
def planted():
    """Shared large-norm base, two orthogonal task directions, small noisy task vectors."""
    gen = torch.Generator().manual_seed(1)
    base = make_sd(gen, scale=10.0)
    d = flatten(base).numel()
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    b -= (b @ a) / (a @ a) * a
    dirs = [a, b]
    taus = [
        unflatten(
            (0.05 * (dirs[t] + 0.6 * torch.randn(d, generator=gen, dtype=torch.float64))).float(),
            base,
        )
        for t in TASK
    ]
    contribs = [contribution(i, base, taus[i], SIZES[i]) for i in range(4)]
    return base, contribs


def assert_well_formed(out: dict, base: dict) -> None:
    assert shapes(out) == shapes(base)
    for v in out.values():
        assert v.dtype == torch.float32
        assert bool(torch.isfinite(v).all())


def combo(base: dict, contribs, idx, weights) -> dict:
    return add_scaled(base, [contribs[k].task_vector for k in idx], list(weights))


def assert_sd_close(a: dict, b: dict, **kw) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


def test_registry_and_unknown_name():
    assert set(STRATEGIES) == {
        "local",
        "fedavg",
        "fedamp_raw",
        "fedbip",
        "fedbip_relative",
        "fedbip_layerwise",
        "clustered",
    }
    for name, cls in STRATEGIES.items():
        s = get_strategy(name, group_threshold=0.2, staleness_exponent=1.0)
        assert isinstance(s, cls) and isinstance(s, Strategy) and s.name == name
    with pytest.raises(ValueError) as e:
        get_strategy("fedprox")
    assert "fedprox" in str(e.value) and "fedbip_layerwise" in str(e.value)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_well_formed(planted, name):
    base, contribs = planted
    s = get_strategy(name)
    plan = s.plan(contribs)
    assert isinstance(plan, Plan)
    assert plan.similarity.shape == (4, 4) and plan.similarity.dtype == torch.float64
    assert len(plan.groups) == 4
    for t in range(4):
        assert_well_formed(s.personalize(t, base, contribs, plan), base)


def test_local(planted):
    base, contribs = planted
    s = get_strategy("local")
    plan = s.plan(contribs)
    assert torch.equal(plan.similarity, torch.eye(4, dtype=torch.float64))
    assert plan.groups == [0, 1, 2, 3]
    for t in range(4):
        out = s.personalize(t, base, contribs, plan)
        for k in base:
            assert torch.equal(out[k], base[k] + contribs[t].task_vector[k])


def test_fedavg_same_for_everyone_and_size_weighted(planted):
    base, contribs = planted
    s = get_strategy("fedavg")
    plan = s.plan(contribs)
    assert plan.groups == [0, 0, 0, 0]
    outs = [s.personalize(t, base, contribs, plan) for t in range(4)]
    for o in outs[1:]:
        for k in base:
            assert torch.equal(o[k], outs[0][k])
    total = sum(SIZES)
    expected = {
        k: base[k] + sum(SIZES[i] / total * contribs[i].task_vector[k] for i in range(4))
        for k in base
    }
    assert_sd_close(outs[0], expected, rtol=1e-5, atol=1e-6)


def test_fedbip_groups_and_weights(planted):
    base, contribs = planted
    s = get_strategy("fedbip")
    plan = s.plan(contribs)
    assert plan.groups == [0, 0, 1, 1]
    sim = plan.similarity
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5
    assert abs(sim[0, 2]) < 0.2
    for t, peer, others in [(0, 1, (2, 3)), (3, 2, (0, 1))]:
        out = s.personalize(t, base, contribs, plan)
        s_peer = max(float(sim[t, peer]), 0.0)
        idx = sorted([t, peer])
        w = {t: 1.0 / (1.0 + s_peer), peer: s_peer / (1.0 + s_peer)}
        assert_sd_close(out, combo(base, contribs, idx, [w[i] for i in idx]))
        # Nothing of the other task leaks in: the update lies in the span of the group.
        delta = flatten(out) - flatten(base)
        for o in others:
            own = flatten(contribs[o].task_vector)
            assert abs(float(delta.double() @ own.double())) < 0.3 * float(
                delta.double().norm() * own.double().norm()
            )


def test_relative_weights_count_the_client_as_its_nearest_peer():
    row = torch.tensor([0.06, 1.0, 0.1, 0.08, -0.2], dtype=torch.float64)  # self at 1
    p = relative_similarity_weights(row, 1)
    # self = nearest peer (0.1); the rest in proportion; the opposed peer gets nothing
    expected = torch.tensor([0.06, 0.1, 0.1, 0.08, 0.0], dtype=torch.float64) / 0.34
    torch.testing.assert_close(p, expected)
    # independent of the cosines' scale, unlike similarity_weights
    torch.testing.assert_close(relative_similarity_weights(row * 5, 1), p)
    assert not torch.allclose(similarity_weights(row * 5, 1), similarity_weights(row, 1))
    # the same rule as similarity_weights once the nearest peer is at 1
    assert torch.allclose(
        relative_similarity_weights(row / 0.1, 1), similarity_weights(row / 0.1, 1)
    )
    # nobody similar: the client keeps its own update
    lone = relative_similarity_weights(torch.tensor([1.0, -0.3, 0.0]), 0)
    assert lone.tolist() == [1.0, 0.0, 0.0]
    # staleness discounts apply to the peers as in similarity_weights
    disc = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    q = relative_similarity_weights(row, 1, disc)
    assert q[0] < p[0] and abs(float(q.sum()) - 1.0) < 1e-12
    with pytest.raises(IndexError):
        relative_similarity_weights(row, 5)


def test_fedbip_relative_mixes_more_within_the_group_and_nothing_across(planted):
    base, contribs = planted
    paper, relative = get_strategy("fedbip"), get_strategy("fedbip_relative")
    plan = relative.plan(contribs)
    assert plan.groups == paper.plan(contribs).groups == [0, 0, 1, 1]
    for t, peer in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        out = relative.personalize(t, base, contribs, plan)
        idx = sorted([t, peer])
        # two members: the client counts as its one peer, so both weigh 1/2
        assert_sd_close(out, combo(base, contribs, idx, [0.5, 0.5]))
        # the paper's rule keeps more of the client's own update
        w_self = 1.0 / (1.0 + max(float(plan.similarity[t, peer]), 0.0))
        assert w_self > 0.5


def test_fedbip_negative_peer_gets_zero_weight():
    gen = torch.Generator().manual_seed(2)
    base = make_sd(gen, scale=10.0)
    t0 = make_sd(gen, scale=0.05)
    t1 = {k: -v for k, v in t0.items()}  # opposite task
    contribs = [contribution(0, base, t0, 5), contribution(1, base, t1, 5)]
    s = get_strategy("fedbip", group_threshold=-1.0)  # force one group
    plan = s.plan(contribs)
    assert plan.groups == [0, 0]
    out = s.personalize(0, base, contribs, plan)
    for k in base:
        assert torch.equal(out[k], base[k] + t0[k])


def test_fedbip_client_without_similar_peers_keeps_own_update(planted):
    base, contribs = planted
    # Threshold -1 forces one group; the lone client's only peer is opposed.
    lone = {k: -v for k, v in contribs[0].task_vector.items()}
    mix = [contribs[0], contribution(9, base, lone, 7)]
    s = get_strategy("fedbip", group_threshold=-1.0)
    plan = s.plan(mix)
    out = s.personalize(1, base, mix, plan)
    for k in base:
        assert torch.equal(out[k], base[k] + lone[k])


def test_fedbip_staleness_discount(planted):
    base, contribs = planted
    stale = list(contribs)
    stale[1] = contribution(1, base, contribs[1].task_vector, SIZES[1], staleness=3)
    s = get_strategy("fedbip", staleness_exponent=1.0)
    plan = s.plan(stale)
    out = s.personalize(0, base, stale, plan)
    s01 = float(plan.similarity[0, 1])
    disc = staleness_discount(3, 1.0)
    p1 = s01 * disc / (1.0 + s01 * disc)
    assert p1 < s01 / (1.0 + s01)
    assert_sd_close(out, combo(base, stale, [0, 1], [1.0 - p1, p1]))


def test_fedbip_layerwise_weights_per_layer():
    gen = torch.Generator().manual_seed(4)
    base = make_sd(gen, scale=10.0)
    t0 = make_sd(gen, scale=0.05)
    # Agree on the query layer (big), opposite on value and classifier (small): overall > 0.
    t0 = {k: (v * 4 if k.startswith(Q) else v) for k, v in t0.items()}
    t1 = {k: (v if k.startswith(Q) else -v) for k, v in t0.items()}
    contribs = [contribution(0, base, t0, 5), contribution(1, base, t1, 5)]
    lw = get_strategy("fedbip_layerwise")
    plan = lw.plan(contribs)
    assert plan.groups == [0, 0] and plan.similarity[0, 1] > 0.1
    out = lw.personalize(0, base, contribs, plan)
    for k in base:
        if k.startswith(Q):  # similarity 1: equal weights; t0 == t1 here
            torch.testing.assert_close(out[k], base[k] + t0[k])
        else:  # similarity -1: peer gets 0, own update kept exactly
            assert torch.equal(out[k], base[k] + t0[k])
    # Plain FedBip mixes the opposed layers with one global weight, so it differs there.
    fb = get_strategy("fedbip")
    out_fb = fb.personalize(0, base, contribs, fb.plan(contribs))
    s = float(plan.similarity[0, 1])
    cls_key = f"{CLS}.weight"
    torch.testing.assert_close(out_fb[cls_key], base[cls_key] + (1 - s) / (1 + s) * t0[cls_key])
    assert not torch.allclose(out_fb[cls_key], out[cls_key])


def test_fedbip_layerwise_planted_matches_per_layer_formula(planted):
    base, contribs = planted
    s = get_strategy("fedbip_layerwise")
    plan = s.plan(contribs)
    assert plan.groups == [0, 0, 1, 1]
    out = s.personalize(2, base, contribs, plan)
    mats = layerwise_cosine_matrices([contribs[2].task_vector, contribs[3].task_vector])
    ws = set()
    for layer, keys in layers(base).items():
        p = similarity_weights(mats[layer][0], 0)
        ws.add(round(float(p[1]), 6))
        for k in keys:
            t2, t3 = contribs[2].task_vector[k], contribs[3].task_vector[k]
            expected = base[k] + p[0] * t2 + p[1] * t3
            torch.testing.assert_close(out[k], expected.float())
    assert len(ws) > 1  # weights differ per layer


def test_clustered_uniform_in_group(planted):
    base, contribs = planted
    s = get_strategy("clustered")
    plan = s.plan(contribs)
    assert plan.groups == [0, 0, 1, 1]
    for t, group in [(0, [0, 1]), (3, [2, 3])]:
        out = s.personalize(t, base, contribs, plan)
        assert_sd_close(out, combo(base, contribs, group, [0.5, 0.5]))


def test_fedamp_raw_similarity_near_uniform(planted):
    base, contribs = planted
    s = get_strategy("fedamp_raw")
    plan = s.plan(contribs)
    assert plan.groups == [0, 0, 0, 0]
    assert bool((plan.similarity > 0.99).all())
    out = s.personalize(0, base, contribs, plan)
    p = similarity_weights(plan.similarity[0], 0)
    assert float(p.max() - p.min()) < 0.01  # cannot tell the tasks apart
    expected = add_scaled(
        {k: torch.zeros_like(v) for k, v in base.items()},
        [c.trained for c in contribs],
        p.tolist(),
    )
    assert_sd_close(out, expected)


def test_personalize_rejects_bad_inputs(planted):
    base, contribs = planted
    s = get_strategy("fedbip")
    plan = s.plan(contribs)
    with pytest.raises(IndexError):
        s.personalize(4, base, contribs, plan)
    with pytest.raises(ValueError):
        s.personalize(0, base, contribs[:3], plan)
    bad = dict(contribs[1].task_vector)
    bad[f"{CLS}.bias"] = torch.tensor([float("nan"), 0.0, 0.0])
    broken = [contribs[0], contribution(1, base, bad, 3)]
    with pytest.raises(InvalidTaskVector, match=r"client 1.*classifier\.bias.*NaN"):
        s.plan(broken)


def test_cold_start_takes_the_groups_current_models(planted):
    base, contribs = planted
    gen = torch.Generator().manual_seed(7)
    models = {k: make_sd(gen, scale=1.0) for k in range(4)}  # the clients' current θ̄
    fedbip = get_strategy("fedbip", group_threshold=0.2)
    plan = fedbip.plan(contribs)
    assert plan.groups == [0, 0, 1, 1]
    # client 1 is new; its affinity (cosine of its update with each model's move from the
    # initial adapter) points at client 0's group, the only one of that group with a model
    assert fedbip.cold_start_weights(1, plan, {0: 0.5, 2: 0.01, 3: 0.02}) == {0: 1.0}
    # its first θ̄: client 0's model plus its own update, whole
    out = fedbip.cold_start(1, contribs, {0: 1.0}, {0: models[0]})
    assert_sd_close(out, add_scaled(models[0], [contribs[1].task_vector], [1.0]))
    # the group is the peers' group its affinity picks, not the plan's group of the
    # newcomer: here the plan put client 1 with client 0, its affinity says 2 and 3
    assert fedbip.cold_start_weights(1, plan, {0: 0.01, 2: 0.3, 3: 0.1}) == pytest.approx(
        {2: 0.75, 3: 0.25}
    )
    # weights: affinity clipped at 0 and normalized; clustered: uniform over the group;
    # fedavg: every client's model (the global one)
    one = Plan(similarity=torch.eye(6, dtype=torch.float64), groups=[0, 0, 0, 0, 1, 2])
    near = {1: 0.3, 2: 0.1, 3: -0.2, 4: 0.0, 5: 0.01}
    assert fedbip.cold_start_weights(0, one, near | {3: 0.3}) == pytest.approx(
        {1: 0.3 / 0.7, 2: 0.1 / 0.7, 3: 0.3 / 0.7}
    )
    assert get_strategy("clustered").cold_start_weights(0, one, near | {3: 0.3}) == pytest.approx(
        {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}
    )
    assert get_strategy("fedavg").cold_start_weights(3, plan, {0: 0, 1: 0, 2: 0}) == (
        pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    )
    # no collaboration, or no group it points to: the usual rule
    assert not get_strategy("local").places_newcomers
    assert not get_strategy("fedamp_raw").places_newcomers
    assert get_strategy("local").cold_start_weights(1, plan, {0: 0.5}) is None
    assert fedbip.cold_start_weights(1, plan, {}) is None
    assert fedbip.cold_start_weights(1, plan, {0: -0.5, 2: -0.5, 3: -0.4}) is None
    with pytest.raises(ValueError, match="sum to 1"):
        fedbip.cold_start(1, contribs, {0: 0.5}, {0: models[0]})
