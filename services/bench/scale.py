"""`fedvec bench scale`: what one update costs the aggregator at N clients and d parameters,
with the sketch index (aggregator/sketch_index.py) against the naive exact row.

Synthetic task vectors with planted groups (Planted) are generated per client on demand,
never N × d at once. Per (N, d) cell:

- latency of single events: the index update (the similarity row over N sketches and the
  regroup), picking the m peers, exact cosines and the personalized aggregate over the
  client and its peers. Excluded, as transfer: producing the full vectors (in the service,
  fetching them) and the sketch, which the worker computes (timed apart, CPU here);
- sustained updates/s: batches of events that arrive together (one similarity product per
  batch, one exact pass per group of the batch);
- naive: the exact cosine of the update with all N full vectors, one pass over N × d
  floats (norms taken as known); streamed in chunks through one buffer where N × d does not
  fit;
- memory: the index, the exact step's working set, the process's peak RSS growth;
- sketch error against exact cosines on the pairs the cell produced.

An accuracy part holds N_acc full vectors (the exact reference needs them) and reports the
sketch's error over all pairs and how the index's groups agree with the same grouping run on
exact similarity, for a few sketch sizes k.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from aggregator.sketch import (
    DEFAULT_SKETCH_DIM,
    DEFAULT_SKETCH_SEED,
    expected_error,
    layout,
    normalize,
    sketch,
    sketch_rows,
)
from aggregator.sketch_index import DEFAULT_PEERS, SketchIndex, exact_aggregates
from services.bench.common import percentile
from services.bench.scale_service import run_service_bench
from services.console import Echo
from services.settings import Settings, load_settings

_MASK63 = (1 << 63) - 1
_MB = 1 << 20

# Targets of the issue, printed next to the figures.
TARGET_P95_MS = 250.0
TARGET_UPDATES_PER_S = 20.0
TARGET_ERROR_P99 = 0.02
TARGET_AGREEMENT = 0.99


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    clients: tuple[int, ...] = (100, 1_000, 10_000)
    dims: tuple[int, ...] = (74_000, 1_000_000, 4_200_000)
    k: int = DEFAULT_SKETCH_DIM
    peers: int = DEFAULT_PEERS
    group_size: int = 50  # planted clients per group
    threshold: float = 0.3  # average-linkage threshold (see Planted for the margins)
    updates: int = 20  # single events timed per cell
    batches: int = 2  # sustained: batches of batch_size events
    batch_size: int = 16
    naive_updates: int = 2
    error_pairs: int = 32  # random unrelated pairs per cell for the sketch error
    naive_buffer_mb: int = 512
    # Math threads. 1 by default: on 2 cores the other serves the aggregator's I/O, and a
    # 2-thread pool stalls at every barrier when anything else runs (observed: 5-25× slower
    # exact steps on a shared machine); memory-bound passes gain little from a second one.
    threads: int = 1
    accuracy_clients: int = 1_000
    accuracy_dim: int = 262_144
    seed: int = 0
    # the service part (services/bench/scale_service.py): "postgres", "sqlite" or "none"
    service_db: str = "postgres"
    service_events: int = 20


QUICK = ScalePlan(
    clients=(100, 1_000),
    dims=(74_000, 262_144),
    updates=10,
    batches=1,
    batch_size=8,
    naive_updates=1,
    error_pairs=16,
    naive_buffer_mb=128,
    accuracy_clients=300,
    accuracy_dim=74_000,
    service_events=10,
)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over 64-bit words): stable across runs."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & _MASK63


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Planted:
    """Task vectors with planted groups, any client's on demand.

    τ_i = c_i (s_i u_g + sqrt(1 − s_i²) ε_i), u_g = sqrt(β) f_F + sqrt(1 − β) w_g, with f
    (per family of 4 groups), w (per group) and ε (per client and version) independent
    N(0, I/d) "latent" vectors, s_i in [0.6, 0.85], β = 0.3, c_i in [0.5, 2] (task-vector norms
    differ). Exact cosines: ≈ s_i s_j in a group (0.36-0.72), ≈ β s_i s_j between groups of
    a family (0.11-0.22), ≈ 0 otherwise; a threshold of 0.3 on average linkage separates them.

    With k given, every latent's sketch is drawn first (its exact distribution: N(0, n_b / d)
    in a bucket of n_b coordinates) and its full vector on demand from the Gaussian
    conditional given that sketch: the same joint distribution as drawing the vector and
    sketching it, so N clients' sketches cost O(N · k) and any full vector O(d), consistent
    with its sketch.
    """

    FAMILY = 4
    BETA = 0.3

    def __init__(
        self,
        n: int,
        d: int,
        *,
        seed: int,
        group_size: int,
        k: int | None = None,
        sketch_seed: int = DEFAULT_SKETCH_SEED,
    ) -> None:
        self.n, self.d, self.k, self.seed = n, d, k, seed
        self.groups = max(2, round(n / group_size))
        gen = _gen(_seed(seed, 1))
        self.group = (torch.randperm(n, generator=gen) % self.groups).tolist()
        self.strength = (0.6 + 0.25 * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()
        log_c = math.log(0.5) + math.log(4.0) * torch.rand(n, generator=gen, dtype=torch.float64)
        self.scale = log_c.exp().tolist()
        self.version = [0] * n
        self._full_cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._sketch_cache: dict[tuple[int, int], torch.Tensor] = {}
        if k is not None:
            bucket, sign = layout(0, d, k, sketch_seed)
            self._bucket = bucket
            self._sign = sign.to(torch.float32)
            counts = torch.bincount(bucket, minlength=k).to(torch.float32)
            self._counts = counts
            self._sketch_std = (counts / d).sqrt()

    def family(self, client: int) -> int:
        return self.group[client] // self.FAMILY

    # --- latents: (kind, id, version); kind 0 family, 1 group, 2 client noise ---------
    def _latent_sketch(self, key: tuple[int, int, int]) -> torch.Tensor:
        assert self.k is not None
        e = torch.randn(self.k, generator=_gen(_seed(self.seed, *key, 2)))
        return e * self._sketch_std

    def _latent_full(self, key: tuple[int, int, int]) -> torch.Tensor:
        w = torch.randn(self.d, generator=_gen(_seed(self.seed, *key, 1)))
        w /= math.sqrt(self.d)
        if self.k is None:
            return w
        # z = w + Aᵀ diag(1/n_b) (e − A w): the conditional of w given A z = e
        aw = torch.zeros(self.k).index_add_(0, self._bucket, w * self._sign)
        e = self._latent_sketch(key)
        corr = torch.where(self._counts > 0, (e - aw) / self._counts.clamp(min=1), 0.0)
        return w.add_(torch.index_select(corr, 0, self._bucket).mul_(self._sign))

    def _shared(self, key: tuple[int, int, int], full: bool) -> torch.Tensor:
        """Family and group latents, cached (a few full ones, every sketch)."""
        if not full:
            if key not in self._sketch_cache:
                self._sketch_cache[key] = self._latent_sketch(key)
            return self._sketch_cache[key]
        if key in self._full_cache:
            self._full_cache.move_to_end(key)
            return self._full_cache[key]
        value = self._latent_full(key)
        self._full_cache[key] = value
        if len(self._full_cache) > 6:
            self._full_cache.popitem(last=False)
        return value

    def _combine(self, client: int, full: bool) -> torch.Tensor:
        g = self.group[client]
        s, c = self.strength[client], self.scale[client]
        fam = self._shared((0, g // self.FAMILY, 0), full)
        grp = self._shared((1, g, 0), full)
        key = (2, client, self.version[client])
        noise = self._latent_full(key) if full else self._latent_sketch(key)
        out = noise.mul_(c * math.sqrt(1 - s * s))
        out.add_(fam, alpha=c * s * math.sqrt(self.BETA))
        out.add_(grp, alpha=c * s * math.sqrt(1 - self.BETA))
        return out

    def full(self, client: int) -> torch.Tensor:
        """The client's current task vector, float32 [d]."""
        return self._combine(client, full=True)

    def sketch(self, client: int) -> torch.Tensor:
        """The sketch of full(client) (conditioned mode only), float32 [k], in O(k)."""
        if self.k is None:
            raise ValueError("Planted.sketch needs k")
        return self._combine(client, full=False)

    def bump(self, client: int) -> None:
        """The client trained again: a new task vector, same task."""
        self.version[client] += 1


# --- measuring -----------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_peak_rss_kb = 0  # the highest peak seen across resets


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs), remembering the
    peak so far for the run's total."""
    global _peak_rss_kb
    _peak_rss_kb = max(_peak_rss_kb, _status_kb("VmHWM") or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of clients in matched groups under a one-to-one matching of the two labelings
    (greedy by overlap, ties by label): 1.0 when they are the same partition. Counts both a
    split and a merge as disagreement, unlike purity."""
    if len(a) != len(b) or not a:
        raise ValueError("agreement: labelings must be non-empty and of equal length")
    overlap = Counter(zip(a, b, strict=True))
    used_a: set[int] = set()
    used_b: set[int] = set()
    matched = 0
    for (la, lb), count in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if la in used_a or lb in used_b:
            continue
        used_a.add(la)
        used_b.add(lb)
        matched += count
    return matched / len(a)


def _bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def _err_stats(errors: Sequence[float]) -> dict[str, Any]:
    if not errors:
        return {"pairs": 0}
    return {
        "pairs": len(errors),
        "p50": percentile(errors, 50),
        "p99": percentile(errors, 99),
        "max": max(errors),
    }


# --- one (N, d) cell -------------------------------------------------------------------------
def run_cell(plan: ScalePlan, n: int, d: int, *, show: bool = True) -> dict[str, Any]:
    gc.collect()
    rss0 = _status_kb("VmRSS")
    planted = Planted(n, d, seed=_seed(plan.seed, n, d), group_size=plan.group_size, k=plan.k)
    index = SketchIndex(plan.k, plan.threshold)
    rng = random.Random(_seed(plan.seed, n, d, 7))

    t0 = time.perf_counter()
    step = 1024
    with _bar(n, f"index N={n:,}", show) as bar:
        for a in range(0, n, step):
            ids = range(a, min(n, a + step))
            index.update([(i, planted.sketch(i)) for i in ids], similarity=False)
            bar.update(len(ids))
    build_s = time.perf_counter() - t0

    gc.collect()
    peak_tracked = _reset_peak_rss()
    rss_before_updates = _status_kb("VmRSS")
    latencies: list[float] = []
    parts: dict[str, list[float]] = {"row_regroup": [], "peers": [], "exact": []}
    worker_sketch: list[float] = []
    in_group_err: list[float] = []
    generator_check = 0.0
    last: tuple[int, torch.Tensor, Any] | None = None
    with _bar(plan.updates + 1, f"events N={n:,} d={d:,}", show) as bar:
        for u in range(plan.updates + 1):  # the first one warms up, untimed
            cid = rng.randrange(n)
            planted.bump(cid)
            full = planted.full(cid)  # arrives from the worker (transfer: not timed)
            t = time.perf_counter()
            sk = sketch(full, plan.k)  # the worker's job: timed apart
            worker_sketch.append(time.perf_counter() - t)
            drawn = normalize(planted.sketch(cid))
            generator_check = max(generator_check, float((normalize(sk) - drawn).abs().max()))

            t1 = time.perf_counter()
            (up,) = index.update([(cid, sk)])
            t2 = time.perf_counter()
            peer_ids = index.peers(up, plan.peers)
            t3 = time.perf_counter()
            # the working set, loaded into one [1 + m, d] buffer (transfer: not timed)
            vectors = torch.empty(1 + len(peer_ids), d)
            vectors[0] = full
            for j, p in enumerate(peer_ids, start=1):
                vectors[j] = planted.full(p)
            t4 = time.perf_counter()
            (agg,) = exact_aggregates(vectors, [0], [list(range(1, len(vectors)))])
            t5 = time.perf_counter()
            if u > 0:
                parts["row_regroup"].append(t2 - t1)
                parts["peers"].append(t3 - t2)
                parts["exact"].append(t5 - t4)
                latencies.append((t2 - t1) + (t3 - t2) + (t5 - t4))
            for j, p in enumerate(peer_ids, start=1):
                est = float(up.similarity[index.row_of(p)])
                in_group_err.append(abs(est - float(agg.cosine[j])))
            last = (cid, full, up)
            del vectors, agg
            bar.update(1)

    # sustained: batches of events that arrive together
    busy = 0.0
    events = 0
    with _bar(plan.batches * plan.batch_size, f"batches N={n:,} d={d:,}", show) as bar:
        for _ in range(plan.batches):
            cids = rng.sample(range(n), min(n, plan.batch_size))
            for c in cids:
                planted.bump(c)
            batch = [(c, planted.sketch(c)) for c in cids]  # the workers' sketches
            t = time.perf_counter()
            ups = index.update(batch)
            busy += time.perf_counter() - t
            by_group: dict[int, list[Any]] = defaultdict(list)
            for up in ups:
                by_group[up.group].append(up)
            for group_ups in by_group.values():
                t = time.perf_counter()
                peer_lists = [index.peers(up, plan.peers) for up in group_ups]
                busy += time.perf_counter() - t
                members = list(
                    dict.fromkeys([up.client_id for up in group_ups] + sum(peer_lists, []))
                )
                where = {c: i for i, c in enumerate(members)}
                vectors = torch.empty(len(members), d)  # transfer: not timed
                for j, c in enumerate(members):
                    vectors[j] = planted.full(c)
                t = time.perf_counter()
                exact_aggregates(
                    vectors,
                    [where[up.client_id] for up in group_ups],
                    [[where[p] for p in peers] for peers in peer_lists],
                )
                busy += time.perf_counter() - t
                del vectors
                bar.update(len(group_ups))
            events += len(ups)
    peak_kb = _status_kb("VmHWM") if peak_tracked else None

    # sketch error on unrelated pairs at this d
    unrelated_err: list[float] = []
    if last is not None and plan.error_pairs > 0:
        cid, full, up = last
        others = [c for c in range(n) if planted.group[c] != planted.group[cid]]
        for c in rng.sample(others, min(len(others), plan.error_pairs)):
            other = planted.full(c)
            exact = float(torch.nn.functional.cosine_similarity(full, other, dim=0))
            unrelated_err.append(abs(float(up.similarity[index.row_of(c)]) - exact))
        del full, other
    last = None

    naive = run_naive(n, d, plan, show=show)
    gc.collect()
    p50 = percentile(latencies, 50)
    vector_mb = d * 4 / _MB
    return {
        "clients": n,
        "dim": d,
        "groups_planted": planted.groups,
        "groups_found": len(index.groups()),
        "index_build_s": build_s,
        "latency_ms": {
            "p50": 1e3 * p50,
            "p95": 1e3 * percentile(latencies, 95),
            "max": 1e3 * max(latencies),
            "events": len(latencies),
        },
        "parts_ms_p50": {k: 1e3 * percentile(v, 50) for k, v in parts.items()},
        "worker_sketch_ms_p50": 1e3 * percentile(worker_sketch[1:] or worker_sketch, 50),
        "sustained_updates_per_s": events / busy if busy > 0 else float("nan"),
        "sustained_events": events,
        "naive_ms": 1e3 * naive["seconds"],
        "naive_mode": naive["mode"],
        "naive_over_fedvec": naive["seconds"] / p50 if p50 > 0 else float("nan"),
        "memory_mb": {
            "index": index.nbytes / _MB,
            "exact_working_set": (1 + plan.peers + 1) * vector_mb,  # vectors + delta
            "n_times_d": n * vector_mb,
            "rss_growth_peak": (
                (peak_kb - rss0) / 1024 if peak_kb is not None and rss0 is not None else None
            ),
            "rss_at_updates": (
                (rss_before_updates - rss0) / 1024
                if rss_before_updates is not None and rss0 is not None
                else None
            ),
        },
        "sketch_error": {
            "in_group": _err_stats(in_group_err),
            "unrelated": _err_stats(unrelated_err),
            "all": _err_stats(in_group_err + unrelated_err),
        },
        "generator_check": generator_check,
    }


def run_naive(n: int, d: int, plan: ScalePlan, *, show: bool = True) -> dict[str, Any]:
    """Exact cosine of one update with all N full vectors: one pass over N × d floats (dot
    products; norms taken as known, which favours the naive method). Where N × d does not fit
    the buffer, the same buffer of C vectors is streamed N / C times: the cost is the pass
    over N × d floats, whatever their values."""
    c = max(1, min(n, (plan.naive_buffer_mb * _MB) // (d * 4)))
    buffer = torch.randn(c, d, generator=_gen(_seed(plan.seed, n, d, 11)))
    x = torch.randn(d, generator=_gen(_seed(plan.seed, n, d, 12)))
    times: list[float] = []
    with _bar(plan.naive_updates, f"naive N={n:,} d={d:,}", show) as bar:
        for _ in range(plan.naive_updates):
            t = time.perf_counter()
            done = 0
            while done < n:
                m = min(c, n - done)
                _ = buffer[:m] @ x
                done += m
            times.append(time.perf_counter() - t)
            bar.update(1)
    mode = "in memory" if c == n else f"streamed: {math.ceil(n / c):,} chunks of {c:,} vectors"
    return {"seconds": sum(times) / len(times), "mode": mode}


# --- accuracy: sketch against exact, on held full vectors --------------------------------------
def run_accuracy(plan: ScalePlan, *, show: bool = True) -> dict[str, Any]:
    n, d = plan.accuracy_clients, plan.accuracy_dim
    planted = Planted(n, d, seed=_seed(plan.seed, 99), group_size=plan.group_size)
    vectors = torch.empty(n, d)
    with _bar(n, f"accuracy vectors N={n:,} d={d:,}", show) as bar:
        for i in range(n):
            vectors[i] = planted.full(i)
            bar.update(1)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for a in range(0, d, 1 << 16):
        block = vectors[:, a : a + (1 << 16)]
        gram += (block @ block.T).to(torch.float64)
    norms = gram.diagonal().sqrt()
    exact = gram / (norms.unsqueeze(0) * norms.unsqueeze(1))
    del gram

    upper = torch.triu_indices(n, n, 1)
    ex = exact[upper[0], upper[1]]
    group = torch.tensor(planted.group)
    family = torch.tensor([planted.family(i) for i in range(n)])
    same_group = group[upper[0]] == group[upper[1]]
    same_family = (family[upper[0]] == family[upper[1]]) & ~same_group
    order = torch.randperm(n, generator=_gen(_seed(plan.seed, 98))).tolist()

    def groups_of(index: SketchIndex, rows: torch.Tensor) -> list[int]:
        for a in range(0, n, 100):
            ids = order[a : a + 100]
            index.update([(i, rows[i]) for i in ids], similarity=False)
        labels = index.labels()
        return [labels[i] for i in range(n)]

    # The reference: the same online grouping on exact similarity. Rows of V·sqrt(Λ) from
    # exact = V Λ Vᵀ have exactly the unit vectors' inner products in n dimensions, so the
    # index fed with them groups by exact cosines at n × n cost instead of n × d.
    evals, evecs = torch.linalg.eigh(exact)
    coords = (evecs * evals.clamp(min=0).sqrt()).to(torch.float32)
    exact_labels = groups_of(SketchIndex(n, plan.threshold), coords)
    del evals, evecs, coords
    ks = sorted({1024, 4096, plan.k} | ({16384} if plan.k > 16384 else set()))
    sweep = []
    by_kind: dict[str, Any] = {}
    sketch_labels: list[int] = []
    with _bar(len(ks), "accuracy k sweep", show) as bar:
        for k in ks:
            sketches = sketch_rows(vectors, k)
            unit = normalize(sketches)
            est = (unit @ unit.T).to(torch.float64)[upper[0], upper[1]]
            err = (est - ex).abs()
            labels = groups_of(SketchIndex(k, plan.threshold), sketches)
            sweep.append(
                {
                    "k": k,
                    "p50": float(err.quantile(0.5)),
                    "p99": float(err.quantile(0.99)),
                    "max": float(err.max()),
                    "expected_p99_unrelated": 2.576 * expected_error(k, d),
                    "agreement": agreement(labels, exact_labels),
                    "groups": len(set(labels)),
                }
            )
            if k == plan.k:
                sketch_labels = labels
                for name, mask in (
                    ("same_group", same_group),
                    ("same_family", same_family),
                    ("unrelated", ~(same_group | same_family)),
                ):
                    e = err[mask]
                    by_kind[name] = {
                        "pairs": int(mask.sum()),
                        "exact_mean": float(ex[mask].mean()),
                        "p50": float(e.quantile(0.5)) if e.numel() else float("nan"),
                        "p99": float(e.quantile(0.99)) if e.numel() else float("nan"),
                    }
            bar.update(1)
    default = next(s for s in sweep if s["k"] == plan.k)
    return {
        "clients": n,
        "dim": d,
        "pairs": int(ex.numel()),
        "k": plan.k,
        "p50": default["p50"],
        "p99": default["p99"],
        "max": default["max"],
        "by_kind": by_kind,
        "agreement_with_exact": default["agreement"],
        "planted_agreement_sketch": agreement(sketch_labels, planted.group),
        "planted_agreement_exact": agreement(exact_labels, planted.group),
        "groups_exact": len(set(exact_labels)),
        "groups_planted": planted.groups,
        "k_sweep": sweep,
    }


# --- the whole benchmark --------------------------------------------------------------------
def run_scale_bench(
    plan: ScalePlan, echo: Echo, *, show: bool = True, settings: Settings | None = None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _run(plan, echo, show, t_start, settings or load_settings())
    finally:
        torch.set_num_threads(threads_before)


def _run(
    plan: ScalePlan, echo: Echo, show: bool, t_start: float, settings: Settings
) -> dict[str, Any]:
    echo(
        f"fedvec bench scale: count sketch k={plan.k:,} ({plan.k * 4 // 1024} KB per client), "
        f"peers m={plan.peers}, planted groups of {plan.group_size} "
        f"(families of {Planted.FAMILY}), threshold {plan.threshold}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    echo(
        "  latency = sketch row over N + regroup + top-m peers + exact in-group cosines + "
        "aggregate; vector transfer and the worker's sketch excluded"
    )
    accuracy = run_accuracy(plan, show=show)
    _echo_accuracy(accuracy, echo)

    cells: list[dict[str, Any]] = []
    for d in plan.dims:
        for n in plan.clients:
            cell = run_cell(plan, n, d, show=show)
            cells.append(cell)
            _echo_cell(cell, echo)
    _echo_table(cells, plan, echo)
    service: list[dict[str, Any]] = []
    if plan.service_db != "none":
        service = run_service_bench(
            settings,
            plan.clients,
            k=plan.k,
            peers=plan.peers,
            database=plan.service_db,
            events=plan.service_events,
            echo=echo,
        )
    summary = {
        "plan": dataclasses.asdict(plan),
        "accuracy": accuracy,
        "cells": cells,
        "service": service,
        "peak_rss_mb": max(_peak_rss_kb, _status_kb("VmHWM") or 0) / 1024,
        "seconds": time.perf_counter() - t_start,
    }
    summary["targets"] = _targets(summary)
    _echo_targets(summary, echo)
    echo(
        f"  process peak RSS {summary['peak_rss_mb']:,.0f} MB (includes the accuracy part's "
        f"{plan.accuracy_clients:,} × {plan.accuracy_dim:,} reference vectors and the generator)"
    )
    echo(
        f"  total time {summary['seconds']:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.1f} (other processes share these {os.cpu_count()} cores)"
    )
    return summary


def _echo_accuracy(acc: dict[str, Any], echo: Echo) -> None:
    echo(
        f"\naccuracy: N={acc['clients']:,} held full vectors of d={acc['dim']:,} "
        f"(exact reference), {acc['pairs']:,} pairs"
    )
    echo(
        f"  sketch |cos error| vs exact at k={acc['k']:,}: p50 {acc['p50']:.4f}  "
        f"p99 {acc['p99']:.4f}  max {acc['max']:.4f}  (target p99 <= {TARGET_ERROR_P99})"
    )
    for name, s in acc["by_kind"].items():
        echo(
            f"    {name:<12} {s['pairs']:>9,} pairs, exact cos mean {s['exact_mean']:+.3f}: "
            f"p50 {s['p50']:.4f}  p99 {s['p99']:.4f}"
        )
    echo(
        f"  group agreement with the same grouping on exact similarity: "
        f"{100 * acc['agreement_with_exact']:.2f}% (target >= {100 * TARGET_AGREEMENT:.0f}%); "
        f"with the planted groups: sketch {100 * acc['planted_agreement_sketch']:.2f}%, "
        f"exact {100 * acc['planted_agreement_exact']:.2f}% "
        f"({acc['groups_exact']} groups found by exact, {acc['groups_planted']} planted)"
    )
    echo("  k sweep:      k   err p50   err p99  (theory p99, unrelated)   agreement  groups")
    for s in acc["k_sweep"]:
        echo(
            f"         {s['k']:>6,}   {s['p50']:.4f}    {s['p99']:.4f}   "
            f"({s['expected_p99_unrelated']:.4f})               "
            f"{100 * s['agreement']:6.2f}%  {s['groups']:>5}"
        )


def _echo_cell(c: dict[str, Any], echo: Echo) -> None:
    lat, mem, err = c["latency_ms"], c["memory_mb"], c["sketch_error"]
    parts = c["parts_ms_p50"]
    rss = mem["rss_growth_peak"]
    echo(
        f"\nN={c['clients']:,} d={c['dim']:,}: per update p50 {lat['p50']:.1f} ms, "
        f"p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms ({lat['events']} events; "
        f"row+regroup {parts['row_regroup']:.1f}, peers {parts['peers']:.2f}, "
        f"exact+aggregate {parts['exact']:.1f} ms at p50)"
    )
    echo(
        f"  sustained {c['sustained_updates_per_s']:.1f} updates/s "
        f"({c['sustained_events']} events in batches); worker sketch "
        f"{c['worker_sketch_ms_p50']:.0f} ms (CPU); index built in {c['index_build_s']:.1f} s; "
        f"groups {c['groups_found']} found / {c['groups_planted']} planted"
    )
    echo(
        f"  naive exact row {c['naive_ms']:.1f} ms ({c['naive_mode']}): "
        f"naive / fedvec = {c['naive_over_fedvec']:.1f}x"
    )
    echo(
        f"  memory: index {mem['index']:.0f} MB, exact working set {mem['exact_working_set']:.0f} "
        f"MB, N·d would be {mem['n_times_d']:,.0f} MB; process RSS growth peak "
        + (f"{rss:.0f} MB" if rss is not None else "n/a")
    )
    echo(
        f"  sketch error vs exact here: in-group p99 {_fmt(err['in_group'], 'p99')} "
        f"({err['in_group']['pairs']} pairs), unrelated p99 {_fmt(err['unrelated'], 'p99')} "
        f"({err['unrelated']['pairs']} pairs); generator check {c['generator_check']:.1e}"
    )


def _fmt(stats: dict[str, Any], key: str) -> str:
    return f"{stats[key]:.4f}" if key in stats else "n/a"


def _echo_table(cells: list[dict[str, Any]], plan: ScalePlan, echo: Echo) -> None:
    dims = sorted({c["dim"] for c in cells})
    clients = sorted({c["clients"] for c in cells})
    at = {(c["clients"], c["dim"]): c for c in cells}
    echo("\nper-update latency p50 / p95 ms (naive / fedvec) by N (rows) and d (columns)")
    echo("          " + "".join(f"{d:>26,}" for d in dims))
    for n in clients:
        row = f"{n:>10,}"
        for d in dims:
            c = at.get((n, d))
            row += (
                f"{c['latency_ms']['p50']:>9.1f} /{c['latency_ms']['p95']:>6.1f} "
                f"({c['naive_over_fedvec']:>5.0f}x)"
                if c
                else f"{'-':>26}"
            )
        echo(row)
    echo(f"sustained updates/s (batches of {plan.batch_size} events)")
    for n in clients:
        row = f"{n:>10,}"
        for d in dims:
            c = at.get((n, d))
            row += f"{c['sustained_updates_per_s']:>26.1f}" if c else f"{'-':>26}"
        echo(row)


def _targets(summary: dict[str, Any]) -> dict[str, Any]:
    cells = summary["cells"]
    big = max(cells, key=lambda c: (c["clients"] * c["dim"], c["dim"]))
    acc = summary["accuracy"]
    out: dict[str, Any] = {
        "cell": {"clients": big["clients"], "dim": big["dim"]},
        "p95_ms": big["latency_ms"]["p95"],
        "p95_met": big["latency_ms"]["p95"] <= TARGET_P95_MS,
        "updates_per_s": big["sustained_updates_per_s"],
        "updates_per_s_met": big["sustained_updates_per_s"] >= TARGET_UPDATES_PER_S,
        "error_p99": acc["p99"],
        "error_p99_met": acc["p99"] <= TARGET_ERROR_P99,
        "agreement": acc["agreement_with_exact"],
        "agreement_met": acc["agreement_with_exact"] >= TARGET_AGREEMENT,
        # the aggregator's memory at the largest cell against holding N × d
        "memory_mb": big["memory_mb"]["index"] + big["memory_mb"]["exact_working_set"],
        "n_times_d_mb": big["memory_mb"]["n_times_d"],
    }
    if summary.get("service"):
        top = max(summary["service"], key=lambda c: c["clients"])
        # the whole event in the service (small vectors) plus the math at the largest d
        whole = top["latency_ms"]["p95"] + big["latency_ms"]["p95"]
        out["service"] = {
            "clients": top["clients"],
            "p95_ms": top["latency_ms"]["p95"],
            "with_math_p95_ms": whole,
            "met": whole <= TARGET_P95_MS,
        }
    return out


def _echo_targets(summary: dict[str, Any], echo: Echo) -> None:
    t = summary["targets"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    cell = f"N={t['cell']['clients']:,}, d={t['cell']['dim']:,}"
    echo("\ntargets")
    echo(
        f"  p95 per update <= {TARGET_P95_MS:.0f} ms at {cell}: {t['p95_ms']:.1f} ms, "
        f"{mark(t['p95_met'])}"
    )
    echo(
        f"  sustained >= {TARGET_UPDATES_PER_S:.0f} updates/s at {cell}: "
        f"{t['updates_per_s']:.1f}, {mark(t['updates_per_s_met'])}"
    )
    echo(
        f"  sketch error p99 <= {TARGET_ERROR_P99}: {t['error_p99']:.4f}, "
        f"{mark(t['error_p99_met'])}"
    )
    echo(
        f"  group agreement >= {100 * TARGET_AGREEMENT:.0f}%: {100 * t['agreement']:.2f}%, "
        f"{mark(t['agreement_met'])}"
    )
    echo(
        f"  memory at {cell}: index + exact working set {t['memory_mb']:,.0f} MB, "
        f"against {t['n_times_d_mb']:,.0f} MB for N × d"
    )
    if "service" in t:
        sv = t["service"]
        echo(
            f"  the whole event in the service at N={sv['clients']:,}: Aggregator.handle p95 "
            f"{sv['p95_ms']:.1f} ms + the math at {cell} {t['p95_ms']:.1f} ms = "
            f"{sv['with_math_p95_ms']:.1f} ms (<= {TARGET_P95_MS:.0f}: {mark(sv['met'])})"
        )
