"""`fedvec demo`: the whole loop on real data, once per strategy, each in its own embedded
deployment (SQLite, local object store, filesystem broker, a real Celery worker and the
aggregator as child processes), with the same clients, seed and compute budget."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from services import operations as ops
from services.client_data import ClientSpec
from services.console import Echo
from services.console import table as _table
from services.demo_data import build_demo_clients
from services.federation import fresh_federation, running
from services.flan_data import FlanClients, build_flan_clients
from services.settings import Settings


def demo_clients(
    settings: Settings, dataset: str, out_dir: Path, train_per_client: int, test_per_client: int
) -> list[ClientSpec]:
    """The demo's clients: the packaged news and tweet data, or ("flan8") the
    multiple-choice clients of the FLAN folder FEDVEC_FLAN8_DIR."""
    data_dir = out_dir / "data"
    if dataset == "flan8":
        return flan_clients(
            settings.flan8_dir,
            data_dir,
            train_per_client=train_per_client,
            test_per_client=test_per_client,
        ).clients
    return build_demo_clients(
        data_dir,
        train_per_client=train_per_client,
        test_per_client=test_per_client,
        seed=settings.seed,
    )


def flan_clients(data_dir: str | Path, out_dir: Path, **kwargs: Any) -> FlanClients:
    """build_flan_clients, with a missing folder an OperationError that names the setting."""
    try:
        return build_flan_clients(data_dir, out_dir, **kwargs)
    except FileNotFoundError as exc:
        raise ops.OperationError(
            f"{exc}\nGive --data-dir or set FEDVEC_FLAN8_DIR to a FLAN folder "
            f"(now {str(data_dir)!r})."
        ) from None


def run_strategy(
    settings: Settings,
    strategy: str,
    clients: list[ClientSpec],
    rounds: int,
    home: Path,
    echo: Echo,
    timeout: float = 1800,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = fresh_federation(settings, home, clients, strategy=strategy)
    enrolled = ops.resolve_clients(s, [], all_=True)
    with running(s, home / "logs") as service:
        for r in range(1, rounds + 1):
            round_id = ops.start_round(s, enrolled, service.send)
            ops.wait_round(s, round_id, timeout=timeout, alive=service.alive)
            echo(f"  [{strategy}] round {r}/{rounds} aggregated ({time.perf_counter() - t0:.0f}s)")
        evals = ops.evaluate(s, enrolled, service.send, timeout=timeout, alive=service.alive)
    return {
        "strategy": strategy,
        "seconds": time.perf_counter() - t0,
        "accuracy": {e["client"]: e["accuracy"] for e in evals},
        "test_examples": {e["client"]: e["num_examples"] for e in evals},
        "groups": ops.group_of(s),
        "home": str(home),
    }


def run_demo(
    settings: Settings,
    *,
    dataset: str,
    strategies: list[str],
    rounds: int,
    train_per_client: int,
    test_per_client: int,
    out_dir: Path,
    echo: Echo,
) -> dict[str, Any]:
    from aggregator.strategies import STRATEGIES

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ops.OperationError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    t0 = time.perf_counter()
    clients = demo_clients(settings, dataset, out_dir, train_per_client, test_per_client)
    steps = settings.epochs * -(-train_per_client // settings.batch_size)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    echo(
        f"fedvec demo: {len(clients)} clients ({dataset}), {rounds} synchronous rounds, "
        f"{train_per_client} training examples and {steps} LoRA steps per client per round, "
        f"strategies {', '.join(strategies)}"
    )
    runs = []
    for strategy in strategies:
        echo(f"running {strategy} ...")
        runs.append(run_strategy(settings, strategy, clients, rounds, out_dir / strategy, echo))
    wall = time.perf_counter() - t0
    main = runs[0]
    header = [
        "client",
        "task",
        *(f"{r['strategy']} acc" for r in runs),
        f"group ({main['strategy']})",
    ]
    rows = []
    for c in clients:
        rows.append(
            [c.name, c.task]
            + [f"{r['accuracy'].get(c.name, float('nan')):.3f}" for r in runs]
            + [str(main["groups"].get(c.name, "-"))]
        )
    means = [sum(r["accuracy"].values()) / max(len(r["accuracy"]), 1) for r in runs]
    rows.append(["mean", ""] + [f"{m:.3f}" for m in means] + [""])
    n_test = sorted(set(main["test_examples"].values()))
    echo("")
    echo(_table(rows, header))
    echo("")
    echo(
        f"accuracy: each client's personalized adapter on its own test split "
        f"({'/'.join(map(str, n_test))} examples per client, a subset of the data for speed); "
        f"same clients, seed and steps for every strategy"
    )
    echo(
        "time: "
        + ", ".join(f"{r['strategy']} {r['seconds']:.0f}s" for r in runs)
        + f"; total {wall:.0f}s"
    )
    echo(f"each run's database, objects and logs: {out_dir}/<strategy>/")
    return {
        "dataset": dataset,
        "rounds": rounds,
        "steps_per_round": steps,
        "runs": runs,
        "wall_seconds": wall,
        "clients": [{"name": c.name, "task": c.task} for c in clients],
    }
