"""The scalable similarity index: count sketches (aggregator/sketch.py), the sketch index
and the exact in-group step (aggregator/sketch_index.py). Pure math, fixed seeds."""

from __future__ import annotations

import pytest
import torch

from aggregator.aggregation import staleness_discount
from aggregator.grouping import threshold_groups
from aggregator.similarity import cosine, cosine_matrix
from aggregator.sketch import (
    expected_error,
    layout,
    normalize,
    sketch,
    sketch_chunks,
    sketch_cosine,
    sketch_into,
    sketch_rows,
    sketch_similarity,
    sketch_state_dict,
)
from aggregator.sketch_index import SketchIndex, exact_aggregates
from aggregator.strategies import Contribution, FedBip, Plan
from aggregator.task_vectors import flatten, unflatten


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_partition(a: list[int], b: list[int]) -> bool:
    """Equal up to renaming the labels."""
    return len(set(zip(a, b, strict=True))) == len(set(a)) == len(set(b))


def planted(
    n: int, groups: int, d: int, seed: int, noise: float = 1.0
) -> tuple[torch.Tensor, list[int]]:
    g = gen(seed)
    dirs = torch.randn(groups, d, generator=g)
    labels = [i % groups for i in range(n)]
    x = torch.stack([dirs[labels[i]] + noise * torch.randn(d, generator=g) for i in range(n)])
    return x, labels


# --- the sketch ---------------------------------------------------------------------------
def test_same_sketch_whatever_the_chunking_order_and_dtype():
    d = (1 << 20) + 4321  # crosses the layout cache's block edge
    x = torch.randn(d, generator=gen(0))
    whole = sketch(x, 1024, seed=3)
    cuts = [0, 1, 999, 65_537, (1 << 20) - 3, (1 << 20) + 10, d]
    pieces = [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    assert torch.allclose(sketch_chunks(pieces, 1024, seed=3), whole, rtol=0, atol=1e-4)
    acc = torch.zeros(1024, dtype=torch.float64)
    for a, b in reversed(list(zip(cuts, cuts[1:], strict=False))):
        sketch_into(acc, x[a:b], a, seed=3)
    assert torch.allclose(acc.float(), whole, rtol=0, atol=1e-4)
    assert torch.allclose(sketch(x.double(), 1024, seed=3), whole, rtol=0, atol=1e-4)
    assert whole.dtype == torch.float32 and whole.shape == (1024,)


def test_sketch_of_a_state_dict_is_the_sketch_of_its_flattened_vector():
    g = gen(1)
    sd = {
        "b.lora_B.weight": torch.randn(16, 4, generator=g),
        "a.lora_A.weight": torch.randn(4, 16, generator=g),
    }
    assert torch.allclose(sketch_state_dict(sd, 64, 5), sketch(flatten(sd), 64, 5), atol=1e-6)


def test_rows_at_once_equal_one_at_a_time():
    x = torch.randn(7, 30_000, generator=gen(2))
    rows = sketch_rows(x, 512, seed=9)
    for i in range(7):
        assert torch.allclose(rows[i], sketch(x[i], 512, seed=9), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_and_cpu_workers_sketch_alike():
    x = torch.randn(3_000_000, generator=gen(3))
    cpu = sketch(x, 4096, seed=1)
    gpu = sketch(x.cuda(), 4096, seed=1)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-4)


def test_seeds_give_different_layouts_and_the_layout_never_changes():
    x = torch.randn(10_000, generator=gen(4))
    assert torch.equal(sketch(x, 256, seed=1), sketch(x, 256, seed=1))
    assert not torch.allclose(sketch(x, 256, seed=1), sketch(x, 256, seed=2))
    # Stored sketches must stay comparable across versions: pin the hash.
    got = []
    for i in (0, 1, 12_345, (1 << 20) + 5):
        bucket, sign = layout(i, i + 1, 1024, 0)
        got.append((int(bucket[0]), int(sign[0])))
    assert got == [(374, 1), (375, 1), (10, -1), (983, 1)]


def test_buckets_are_balanced_and_signs_fair():
    bucket, sign = layout(0, 64 * 1000, 1000, 0)
    counts = torch.bincount(bucket, minlength=1000)
    assert int(counts.min()) == int(counts.max()) == 64
    assert abs(float(sign.mean())) < 0.02
    assert set(sign.unique().tolist()) == {-1.0, 1.0}


def test_small_vectors_are_sketched_exactly():
    g = gen(5)
    x, y = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    assert sketch_cosine(sketch(x, 4096), sketch(y, 4096)) == pytest.approx(cosine(x, y), abs=1e-6)


def test_sketch_is_linear():
    g = gen(6)
    x, y = torch.randn(50_000, generator=g), torch.randn(50_000, generator=g)
    both = sketch(2.0 * x - 0.5 * y, 1024, 4)
    assert torch.allclose(both, 2.0 * sketch(x, 1024, 4) - 0.5 * sketch(y, 1024, 4), atol=1e-3)


def test_inner_products_are_unbiased():
    g = gen(7)
    x = torch.randn(20_000, generator=g)
    y = 0.5 * x + torch.randn(20_000, generator=g)
    exact = float(torch.dot(x.double(), y.double()))
    estimates = [
        float(torch.dot(sketch(x, 256, s).double(), sketch(y, 256, s).double())) for s in range(300)
    ]
    mean = sum(estimates) / len(estimates)
    spread = (sum((e - mean) ** 2 for e in estimates) / len(estimates)) ** 0.5
    assert abs(mean - exact) < 4 * spread / len(estimates) ** 0.5


def test_cosine_error_matches_the_documented_bound():
    n, d, k = 150, 40_000, 1024
    x = torch.randn(n, d, generator=gen(8))  # unrelated pairs: the worst case, rho ~ 0
    est = sketch_similarity(sketch_rows(x, k), sketch_rows(x, k))
    exact = cosine_matrix(x).float()
    upper = torch.triu_indices(n, n, 1)
    err = (est - exact)[upper[0], upper[1]]
    assert abs(float(err.mean())) < 0.002
    assert float(err.std()) == pytest.approx(expected_error(k, d), rel=0.1)
    assert float(err.abs().quantile(0.99)) < 3 * expected_error(k, d)


def test_similarity_block_and_cosine_agree_and_zero_is_zero():
    s = torch.randn(5, 64, generator=gen(9))
    s[3] = 0
    block = sketch_similarity(s[:2], s)
    assert block.shape == (2, 5)
    for b in range(2):
        for j in range(5):
            assert float(block[b, j]) == pytest.approx(sketch_cosine(s[b], s[j]), abs=1e-6)
    assert float(block[0, 3]) == 0.0
    assert torch.equal(normalize(s)[3], torch.zeros(64))


# --- the index ----------------------------------------------------------------------------
def test_index_finds_planted_groups_and_matches_agglomerative_grouping():
    x, labels = planted(60, 4, 20_000, seed=10)
    sk = sketch_rows(x, 2048)
    index = SketchIndex(2048, threshold=0.3, capacity=4)  # grows by doubling
    index.update([(100 + i, sk[i]) for i in range(60)])
    got = [index.group_of(100 + i) for i in range(60)]
    assert same_partition(got, labels)
    assert same_partition(threshold_groups(cosine_matrix(x), 0.3), labels)
    assert len(index) == 60 and index.client_ids == [100 + i for i in range(60)]
    assert sorted(len(m) for m in index.groups().values()) == [15] * 4
    assert index.nbytes >= 60 * 2048 * 4


def test_update_returns_rows_peers_and_sees_the_batch():
    x, labels = planted(12, 2, 10_000, seed=11)
    sk = sketch_rows(x, 1024)
    index = SketchIndex(1024, threshold=0.3)
    first = index.update([(i, sk[i]) for i in range(10)])
    # two clients of one new task in the same batch form one group together
    assert len({u.group for u in first}) == 2
    assert first[0].previous_group is None
    up = first[4]
    assert up.similarity.shape == (10,) and float(up.similarity[4]) == 1.0
    exact = cosine_matrix(x[:10])[4].float()
    assert torch.allclose(up.similarity, exact, atol=0.1)
    peers = index.peers(up, m=3)
    same = [i for i in range(10) if labels[i] == labels[4] and i != 4]
    assert len(peers) == 3 and set(peers) <= set(same)
    sims = [float(up.similarity[p]) for p in peers]
    assert sims == sorted(sims, reverse=True)
    assert sorted(index.peers(up, m=100)) == same

    (again,) = index.update([(4, sk[4] * 3.0)])  # scale does not matter
    assert again.previous_group == again.group == up.group
    assert torch.allclose(again.similarity, up.similarity, atol=1e-5)


def test_a_client_whose_task_changes_moves_and_empty_groups_vanish():
    x, labels = planted(9, 3, 5_000, seed=12)
    index = SketchIndex(5_000, threshold=0.3)  # k = d: exact vectors work as sketches too
    index.update([(i, x[i]) for i in range(9)])
    target = index.group_of(1)  # planted group 1
    (moved,) = index.update([(0, x[1] + 0.1 * x[0])])
    assert moved.previous_group != moved.group == target
    for i in (3, 6):  # the rest of client 0's old group: it must not keep a stale sum
        index.update([(i, x[1] + 0.01 * x[i])])
    assert moved.previous_group not in index.groups()
    assert len(index.members(target)) == 6


def test_remove_keeps_rows_and_groups_consistent():
    x, _ = planted(8, 2, 5_000, seed=13)
    index = SketchIndex(5_000, threshold=0.3)
    index.update([(i, x[i]) for i in range(8)])
    index.remove(1)
    index.remove(7)
    assert sorted(index.client_ids) == [0, 2, 3, 4, 5, 6] and 1 not in index
    for group, members in index.groups().items():
        for c in members:
            assert index.group_of(c) == group
    (up,) = index.update([(5, x[5])])
    assert float(up.similarity[index.client_ids.index(5)]) == 1.0
    assert float(up.similarity[index.client_ids.index(3)]) > 0.3  # planted together


def test_groups_merge_when_their_average_linkage_reaches_the_threshold():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    index = SketchIndex(3, threshold=0.3)
    index.update([(1, e1), (2, e2)])
    assert index.group_of(1) != index.group_of(2)
    index.update([(3, e1 + e2)])  # cos 0.71 with both: joins one, then (0 + 0.71) / 2 >= 0.3
    assert index.group_of(1) == index.group_of(2) == index.group_of(3)
    assert len(index.groups()) == 1


def test_a_batch_groups_exactly_as_one_at_a_time_and_the_bookkeeping_stays_exact():
    x, _ = planted(90, 6, 4_000, seed=17, noise=1.3)
    g = gen(18)
    moves = [
        (int(i), x[int(j)] + 0.5 * torch.randn(4_000, generator=g))
        for i, j in torch.randint(0, 90, (40, 2), generator=g)
    ]
    events = [(i, x[i]) for i in range(90)] + moves
    batched, single = SketchIndex(4_000, 0.3), SketchIndex(4_000, 0.3)
    for a in range(0, len(events), 25):
        batched.update(events[a : a + 25])
    for e in events:
        single.update([e])
    for i in (3, 50, 77):
        batched.remove(i)
        single.remove(i)
    assert batched.labels() == single.labels()
    # the group sums and their Gram matrix match a recomputation from the rows
    used = batched._sizes > 0
    for group, members in batched.groups().items():
        slot = batched._slot[group]
        rows = torch.stack([batched.unit_sketch(c) for c in members]).double()
        assert torch.allclose(batched._sums[slot], rows.sum(0), atol=1e-9)
        assert int(batched._sizes[slot]) == len(members)
    sums = batched._sums[used]
    assert torch.allclose(batched._gram[used][:, used], sums @ sums.T, atol=1e-8)
    assert float(batched._gram[~used].abs().sum()) == 0.0


def test_index_refuses_bad_sketches():
    index = SketchIndex(8, threshold=0.3)
    with pytest.raises(ValueError):
        index.update([(1, torch.ones(7))])
    with pytest.raises(ValueError):
        index.update([(1, torch.full((8,), float("nan")))])


# --- the exact step inside the group --------------------------------------------------------
def make_sd(g: torch.Generator, direction: dict | None = None, noise: float = 1.0) -> dict:
    shapes = {"m.q.lora_A.weight": (4, 16), "m.q.lora_B.weight": (16, 4), "m.cls.weight": (3, 16)}
    sd = {k: noise * torch.randn(*s, generator=g) for k, s in shapes.items()}
    if direction is not None:
        sd = {k: sd[k] + direction[k] for k in sd}
    return sd


def test_exact_aggregate_equals_fedbip_on_the_group():
    g = gen(14)
    common = make_sd(g)
    taus = [make_sd(g, common, 0.7) for _ in range(4)]
    taus.append({k: -v for k, v in taus[1].items()})  # a conflicting member: weight 0
    base = make_sd(g)
    staleness = [0, 2, 0, 5, 1]
    contributions = [
        Contribution(client_id=i, task_vector=t, trained=t, num_examples=10, staleness=s)
        for i, (t, s) in enumerate(zip(taus, staleness, strict=True))
    ]
    strategy = FedBip(staleness_exponent=0.5)
    flat = torch.stack([flatten(t) for t in taus])
    plan = Plan(similarity=cosine_matrix(flat), groups=[0] * 5)
    reference = strategy.personalize(0, base, contributions, plan)

    discounts = torch.tensor([staleness_discount(s, 0.5) for s in staleness])
    (agg,) = exact_aggregates(list(flat), [0], [[1, 2, 3, 4]], discounts, chunk=7)
    assert agg.rows == [0, 1, 2, 3, 4]
    for j in range(1, 5):
        assert float(agg.cosine[j]) == pytest.approx(cosine(flat[0], flat[j]), abs=1e-6)
    assert float(agg.weights[4]) == 0.0 and float(agg.weights.sum()) == pytest.approx(1.0)
    mine = {k: base[k] + v for k, v in unflatten(agg.delta, base).items()}
    for k in reference:
        assert torch.allclose(mine[k], reference[k], atol=1e-5), k


def test_batched_targets_equal_single_calls_and_chunking_does_not_matter():
    x, _ = planted(6, 1, 3_001, seed=15)
    vectors = list(x)
    vectors[5] = torch.zeros(3_001)  # a client that did not move: cosine 0, weight 0
    peers = [[1, 2, 5], [0, 3, 2]]
    both = exact_aggregates(vectors, [0, 4], peers, chunk=1000)
    for j, (t, p) in enumerate(zip([0, 4], peers, strict=True)):
        (alone,) = exact_aggregates(vectors, [t], [p], chunk=1 << 16)
        assert both[j].rows == alone.rows == [t, *p]
        assert torch.allclose(both[j].cosine, alone.cosine, atol=1e-9)
        assert torch.allclose(both[j].delta, alone.delta, atol=1e-5)
    stacked = exact_aggregates(torch.stack(vectors), [0, 4], peers, chunk=999)
    for a, b in zip(both, stacked, strict=True):
        assert a.rows == b.rows and torch.allclose(a.cosine, b.cosine, atol=1e-9)
        assert torch.allclose(a.delta, b.delta, atol=1e-6)
    assert float(both[0].cosine[3]) == 0.0 and float(both[0].weights[3]) == 0.0
    expected = sum(
        float(w) * vectors[r] for w, r in zip(both[1].weights, both[1].rows, strict=True)
    )
    assert torch.allclose(both[1].delta, expected, atol=1e-5)


def test_exact_step_without_peers_keeps_the_clients_own_update():
    v = torch.randn(100, generator=gen(16))
    (agg,) = exact_aggregates([v], [0], [[]])
    assert agg.rows == [0] and torch.equal(agg.delta, v)
