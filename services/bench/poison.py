"""`fedvec bench poison`: does screening keep a poisoned client from hurting the honest ones,
measured on the real model and data?

10 honest clients from the demo data (`build_demo_clients`: 6 clients with task and label
skew; with more than 6 wanted, each demo client's records are split into disjoint shares,
so e.g. `news-a-1` and `news-a-2` have the same task and label mix but different records)
and, in the attacked runs, 1 poisoned client. Per strategy and attack, three runs on the
same clients, seeds and budget:

- (a) the honest clients only;
- (b) with the poisoned client, screening on (FEDVEC_OUTLIER_NORM_RATIO / _FLIP_COSINE as
  set, default 10 / 0.95);
- (c) with the poisoned client, screening off (both 0).

Each round the poisoned client sends the victim's (the first honest client's) freshly trained
τ of that round, scaled 50× (`scaled`: a model-replacement / boosting attack) or negated
(`flipped`). It is a compromised worker: it trains nothing, and its crafted adapter goes
through the worker's own write path (`workers.tasks.run_training`: τ = θ − θ̄, norm, sketch,
objects, the row signed with the client's own secret, the event), so the aggregator sees
what a real attacker enrolled as a client could send.

The code path is fedvec's, in this process, on the embedded backend (SQLite, local object
store), as `fedvec demo` deploys it: `ops.enroll` and `ops.start_round`; the worker's task
bodies `run_training` / `run_evaluation` (the same model runtime, loaded once); and
`Aggregator.handle` for every `update.stored` event, in the order a single worker and the
single aggregator consumer would see them. Only Celery's transport is left out: starting a
worker and an aggregator process for each of the 5 runs per strategy costs more than the
quick run's whole budget, and changes nothing the comparison measures.

Printed per strategy and attack: the honest clients' mean and minimum personalized accuracy
(each on its own test split) in each run, the updates quarantined, and whether the honest
clients' personalized adapters (every version) are bit-identical between (a) and (b), by
the sha256 of their bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import select

from schema.events import Message, TrainRequest
from schema.models import Client, PersonalizedAdapter, RoundStatus, Update, UpdateStatus
from services import adapter_store as ads
from services import operations as ops
from services.client_data import ClientSpec, load_examples, write_jsonl
from services.console import Echo
from services.console import table as _table
from services.context import object_store
from services.db import session_scope
from services.demo_data import DEMO_CLIENTS, build_demo_clients
from services.federation import fresh_federation
from services.object_store import ObjectNotFound
from services.settings import Settings

ATTACKS = ("scaled", "flipped")
SCALE = 50.0  # the `scaled` attack's factor, as in tests/test_aggregator_service.py
ATTACKER = "poisoned"
RUNS = {
    "a": "(a) honest only",
    "b": "(b) poisoned, screening on",
    "c": "(c) poisoned, screening off",
}
_LOGGERS = ("workers", "aggregator", "services")


@dataclass(frozen=True)
class PoisonPlan:
    honest: int = 10
    rounds: int = 2
    train_per_client: int = 32  # 4 LoRA steps per round at batch 8
    test_per_client: int = 32
    # fedbip, the main strategy; `--strategies fedbip,fedavg` adds FedAvg, where a boosted or
    # flipped update reaches everyone (one mean, weighted by claimed size only), at twice
    # the time
    strategies: tuple[str, ...] = ("fedbip",)
    attacks: tuple[str, ...] = ATTACKS
    max_steps: int = 0  # 0: one epoch of train_per_client
    learning_rate: float = 5e-3  # the demo's
    max_length: int = 64  # the demo's
    seed: int = 0


# the fewest that still runs the whole path: the norm check needs 3 peers besides the
# attacker (aggregator/outliers.py MIN_PEERS); one round of one step
QUICK = PoisonPlan(honest=4, rounds=1, train_per_client=8, test_per_client=8)


def poison_clients(
    data_dir: Path, honest: int, train_per_client: int, test_per_client: int, seed: int
) -> list[ClientSpec]:
    """`honest` clients from the demo data: the 6 demo clients, each split into
    ceil(honest / 6) disjoint shares of its records, taken share by share (news-a-1,
    news-b-1, ..., tweets-c-1, news-a-2, ...)."""
    if honest < 1:
        raise ops.OperationError("need at least 1 honest client")
    shares = -(-honest // len(DEMO_CLIENTS))
    demo = build_demo_clients(
        data_dir / "demo",
        train_per_client=train_per_client * shares,
        test_per_client=test_per_client * shares,
        seed=seed,
    )
    out: list[ClientSpec] = []
    for k in range(shares):
        for c in demo:
            if len(out) == honest:
                return out
            name = f"{c.name}-{k + 1}"
            train_path, test_path = data_dir / name / "train.jsonl", data_dir / name / "test.jsonl"
            train, test = load_examples(c.train_path), load_examples(c.test_path)
            write_jsonl(train_path, train[k * train_per_client : (k + 1) * train_per_client])
            write_jsonl(test_path, test[k * test_per_client : (k + 1) * test_per_client])
            out.append(
                dataclasses.replace(
                    c,
                    name=name,
                    train_path=train_path,
                    test_path=test_path,
                    description=f"{c.description}; share {k + 1} of {shares} of its records",
                )
            )
    return out


def poison(tau: dict[str, Any], attack: str) -> dict[str, Any]:
    factor = SCALE if attack == "scaled" else -1.0
    return {k: factor * v for k, v in tau.items()}


@contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """fedvec's own log lines of a run go to its folder, not between the progress bars."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()


def _attacker_train(s: Settings, victim_id: int, round_id: int, attack: str) -> Callable[..., Any]:
    """What the compromised worker's "training" returns: θ = θ̄ + poison(victim's τ of this
    round), so that run_training stores τ = θ − θ̄ = the poisoned vector."""
    from workers.model import TrainResult

    def train(start: dict[str, Any], examples: Any, *, seed: int, progress: Any = None) -> Any:
        with session_scope(s.resolved_database_url) as ses:
            uid = ses.scalars(
                select(Update.uid).where(Update.round_id == round_id, Update.client_id == victim_id)
            ).first()
        store = object_store(s)
        try:  # the victim's stored report: its update is complete (maybe not aggregated yet)
            report = json.loads(store.get(ads.report_key(victim_id, uid or "")))
        except ObjectNotFound:
            raise RuntimeError(
                f"the victim's update of round {round_id} is not stored yet"
            ) from None
        key = ads.update_keys(victim_id, uid)[1]
        sha, steps = report["task_vector_sha256"], report["steps"]
        tau = ads.get_state(store, key, max_bytes=s.max_adapter_bytes, expected_sha256=sha)
        bad = poison(tau, attack)
        adapter = {k: start[k] + bad[k] for k in start}
        return TrainResult(adapter=adapter, steps=steps or 0, loss=0.0, samples=0, duration_s=0.0)

    return train


def run_once(
    settings: Settings,
    plan: PoisonPlan,
    clients: list[ClientSpec],
    *,
    strategy: str,
    attack: str | None,
    screening: bool,
    home: Path,
    label: str,
    show: bool,
) -> dict[str, Any]:
    """One federation: enroll, `plan.rounds` synchronous rounds, evaluate the honest
    clients. attack None: the honest clients only."""
    from tqdm import tqdm

    from aggregator.service import Aggregator
    from services.celery_app import AGGREGATE_TASK, TRAIN_TASK
    from workers.model import get_runtime
    from workers.tasks import run_evaluation, run_training

    t0 = time.perf_counter()
    off = {} if screening else {"outlier_norm_ratio": 0.0, "outlier_flip_cosine": 0.0}
    s = fresh_federation(settings, home, clients, strategy=strategy, **off)
    victim = clients[0]
    if attack is not None:
        # a client like any other: enrolled with data (the victim's, so its claimed size is
        # an honest client's) and its own secret, which signs its updates
        ops.enroll(s, ATTACKER, victim.train_path, task="poisoned")
    enrolled = ops.resolve_clients(s, [], all_=True)
    ids = {c.name: c.id for c in enrolled}
    honest_ids = {ids[c.name] for c in clients}
    attacker_id = ids.get(ATTACKER)

    # the queues, in process: train requests in the order sent, events in the order stored
    queue: list[tuple[str, dict[str, Any]]] = []

    def send(task: str, args: list[Any], **_: Any) -> None:
        queue.append((task, args[0]))

    def publish(message: Message) -> None:
        queue.append((AGGREGATE_TASK, message.to_dict()))

    agg = Aggregator(s)
    outcomes: dict[str, int] = {}
    per_round = len(enrolled)
    total = plan.rounds * per_round + len(clients)
    with (
        _run_log(home / "bench.log"),
        tqdm(total=total, desc=label, unit="task", disable=not show, leave=False) as bar,
    ):
        for _ in range(plan.rounds):
            round_id = ops.start_round(s, enrolled, send)
            while queue:
                task, message = queue.pop(0)
                if task == TRAIN_TASK:
                    req = TrainRequest.from_dict(message)
                    if req.client_id == attacker_id:
                        assert attack is not None
                        fake = _attacker_train(s, ids[victim.name], round_id, attack)
                        with mock.patch.object(get_runtime(s), "train", fake):
                            run_training(s, req, publish, worker="bench-poison-attacker")
                    else:
                        run_training(s, req, publish, worker="bench-poison")
                    bar.update(1)
                elif task == AGGREGATE_TASK:
                    outcome = agg.handle(message)
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                else:  # pragma: no cover - nothing else is sent here
                    raise RuntimeError(f"unexpected task {task}")
            progress = ops.round_progress(s, round_id)
            if progress.status != RoundStatus.AGGREGATED:
                raise ops.OperationError(
                    f"{label}: round {round_id} not aggregated ({progress.reported}/"
                    f"{progress.participants} reported); see {home / 'bench.log'}"
                )
        accuracy: dict[str, float] = {}
        for c in clients:
            # the worker's evaluate task body, in process
            req = ops.evaluate_request(s, ids[c.name])
            accuracy[c.name] = run_evaluation(s, req, lambda _report: None)["accuracy"]
            bar.update(1)
    with session_scope(s.resolved_database_url) as ses:
        rows = ses.execute(
            select(Client.name, PersonalizedAdapter.version, PersonalizedAdapter.sha256)
            .join(Client, Client.id == PersonalizedAdapter.client_id)
            .where(PersonalizedAdapter.client_id.in_(honest_ids))
        ).all()
        statuses = ses.execute(select(Update.client_id, Update.status, Update.reason)).all()
    quarantined = [
        (reason or "").split(":")[0]
        for _, status, reason in statuses
        if status == UpdateStatus.QUARANTINED
    ]
    values = list(accuracy.values())
    return {
        "run": label,
        "strategy": strategy,
        "attack": attack,
        "screening": screening,
        "accuracy": accuracy,
        "mean_accuracy": sum(values) / len(values),
        "min_accuracy": min(values),
        "quarantined": len(quarantined),
        "quarantine_reasons": sorted(set(quarantined)),
        "attacker_updates": sum(1 for cid, _, _ in statuses if cid == attacker_id),
        "attacker_aggregated": sum(
            1 for cid, st, _ in statuses if cid == attacker_id and st == UpdateStatus.AGGREGATED
        ),
        "honest_adapters": {f"{name}@v{v}": sha for name, v, sha in sorted(rows)},
        "events": outcomes,
        "seconds": round(time.perf_counter() - t0, 1),
        "home": str(home),
    }


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Honest adapters of two runs, by (client, version) and the sha256 of their bytes."""
    x, y = a["honest_adapters"], b["honest_adapters"]
    same = sum(1 for k in x if y.get(k) == x[k])
    return {
        "identical": x.keys() == y.keys() and same == len(x),
        "same": same,
        "total": len(x.keys() | y.keys()),
    }


def run_poison_bench(
    settings: Settings, plan: PoisonPlan, out_dir: Path, echo: Echo, show: bool = True
) -> dict[str, Any]:
    from aggregator.strategies import STRATEGIES

    unknown = [x for x in plan.strategies if x not in STRATEGIES]
    if unknown or not plan.strategies:
        raise ops.OperationError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    bad = [x for x in plan.attacks if x not in ATTACKS]
    if bad or not plan.attacks:
        raise ops.OperationError(f"unknown attacks {bad}; known: {list(ATTACKS)}")
    if plan.honest < 4 or plan.rounds < 1:
        raise ops.OperationError(
            "need at least 4 honest clients (the norm check compares with 3 or more peers) "
            "and 1 round"
        )
    t0 = time.perf_counter()
    settings = settings.replace(
        learning_rate=plan.learning_rate,
        max_length=plan.max_length,
        max_steps=plan.max_steps,
        seed=plan.seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = poison_clients(
        out_dir / "data", plan.honest, plan.train_per_client, plan.test_per_client, plan.seed
    )
    steps = settings.epochs * -(-plan.train_per_client // settings.batch_size)
    if plan.max_steps:
        steps = min(steps, plan.max_steps)
    victim = clients[0]
    echo(
        f"fedvec bench poison: {len(clients)} honest clients (demo data, "
        f"{len({c.task for c in clients})} tasks) + 1 poisoned client sending the victim "
        f"{victim.name}'s τ of each round x{SCALE:g} (scaled) or x-1 (flipped); "
        f"{plan.rounds} synchronous round{'s' * (plan.rounds > 1)} of {steps} LoRA "
        f"step{'s' * (steps > 1)} ({plan.train_per_client} examples, lr "
        f"{plan.learning_rate:g}, seed {plan.seed}), {plan.test_per_client} test examples "
        f"per client; strategies {', '.join(plan.strategies)}; screening: norm > "
        f"{settings.outlier_norm_ratio:g}x median, flip cosine <= -{settings.outlier_flip_cosine:g}"
    )
    results: list[dict[str, Any]] = []
    for strategy in plan.strategies:
        clean = run_once(
            settings,
            plan,
            clients,
            strategy=strategy,
            attack=None,
            screening=True,
            home=out_dir / strategy / "a-honest",
            label=f"{strategy} (a)",
            show=show,
        )
        _progress_line(echo, clean)
        attacks: dict[str, Any] = {}
        for attack in plan.attacks:
            runs: dict[str, Any] = {"a": clean}
            for key, screening in (("b", True), ("c", False)):
                runs[key] = run_once(
                    settings,
                    plan,
                    clients,
                    strategy=strategy,
                    attack=attack,
                    screening=screening,
                    home=out_dir / strategy / f"{key}-{attack}",
                    label=f"{strategy} {attack} ({key})",
                    show=show,
                )
                _progress_line(echo, runs[key])
            attacks[attack] = {
                "runs": runs,
                "b_vs_a": _compare(clean, runs["b"]),
                "c_vs_a": _compare(clean, runs["c"]),
            }
        results.append({"strategy": strategy, "attacks": attacks})
    wall = time.perf_counter() - t0
    summary = {
        "plan": dataclasses.asdict(plan),
        "clients": [{"name": c.name, "task": c.task} for c in clients],
        "victim": victim.name,
        "scale": SCALE,
        "outlier_norm_ratio": settings.outlier_norm_ratio,
        "outlier_flip_cosine": settings.outlier_flip_cosine,
        "steps_per_round": steps,
        "results": results,
        "wall_seconds": round(wall, 1),
        "out_dir": str(out_dir),
    }
    echo("")
    echo(render(summary))
    return summary


def _progress_line(echo: Echo, r: dict[str, Any]) -> None:
    echo(
        f"  {r['run']}: honest mean {r['mean_accuracy']:.3f}, min {r['min_accuracy']:.3f}, "
        f"quarantined {r['quarantined']} ({r['seconds']:.0f}s)"
    )


def render(summary: dict[str, Any]) -> str:
    header = [
        "strategy",
        "attack",
        "run",
        "honest mean acc",
        "min",
        "quarantined",
        "honest adapters vs (a)",
    ]
    rows = []
    for res in summary["results"]:
        for attack, entry in res["attacks"].items():
            for key, run in entry["runs"].items():
                if key == "a":
                    versus = "-"
                else:
                    cmp = entry[f"{key}_vs_a"]
                    versus = (
                        f"bit-identical ({cmp['same']}/{cmp['total']})"
                        if cmp["identical"]
                        else f"{cmp['total'] - cmp['same']}/{cmp['total']} differ"
                    )
                quarantined = str(run["quarantined"])
                if run["quarantine_reasons"]:
                    quarantined += f" ({', '.join(run['quarantine_reasons'])})"
                rows.append(
                    [
                        res["strategy"],
                        attack,
                        RUNS[key],
                        f"{run['mean_accuracy']:.3f}",
                        f"{run['min_accuracy']:.3f}",
                        quarantined,
                        versus,
                    ]
                )
    plan = summary["plan"]
    lines = [
        _table(rows, header),
        "",
        f"accuracy: the {len(summary['clients'])} honest clients' personalized adapters, each on "
        f"its own test split ({plan['test_per_client']} examples); the poisoned client is not "
        "scored. Same clients, seeds and steps in every run; (a) is shared by both attacks.",
        f"strategies {', '.join(plan['strategies'])} (fedbip is fedvec's main one; fedavg, "
        "one mean for everyone, is where a poisoned update reaches every client)"
        + f"; victim {summary['victim']}; adapters compared by sha256 of every version",
        "fedbip mixes a client's task vector only with its group's (cosine above the "
        "threshold): a scaled copy joins its victim's group and outweighs it; a flipped copy "
        "never does, so unscreened it reaches no honest adapter under fedbip (it does under "
        "fedavg, which averages everyone)",
        f"time: {summary['wall_seconds']:.0f}s; each run's database, objects and log: "
        f"{summary['out_dir']}/<strategy>/<run>/",
    ]
    return "\n".join(lines)
