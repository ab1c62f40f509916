"""`fedvec bench ...`: the benchmarks (services/bench/), each printing measured figures."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from services.cli.common import (
    echo_for,
    echo_json,
    names,
    plan_with,
    settings_of,
)


@click.group()
def bench() -> None:
    """Benchmarks that print measured figures (see README "Performance")."""


@bench.command("quality")
@click.option(
    "--dataset",
    type=click.Choice(["flan8", "demo"]),
    default="flan8",
    show_default=True,
    help="flan8: a FLAN-format folder (--data-dir); demo: the packaged news and tweet data",
)
@click.option(
    "--data-dir",
    default=None,
    help="a FLAN-format folder: train_client_K.json files and test.jsonl "
    "(default: FEDVEC_FLAN8_DIR); its multiple-choice clients are read from the data",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="cut each FLAN task's training records into N disjoint data-scarce clients",
)
@click.option(
    "--clients",
    "demo_clients",
    type=click.IntRange(min=2),
    default=None,
    help="--dataset demo: number of clients, half news topic, half tweet sentiment "
    "(default 12; quick 6)",
)
@click.option(
    "--strategies",
    default=None,
    help="comma-separated (default: local,fedavg,fedamp_raw,fedbip,fedbip_relative,"
    "fedbip_layerwise,clustered)",
)
@click.option("--rounds", type=int, default=None, help="synchronous rounds (default 3; quick 2)")
@click.option("--epochs", type=int, default=None, help="local epochs per round (default 1)")
@click.option("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0)")
@click.option(
    "--train-per-client",
    type=int,
    default=None,
    help="default: all of a client's training records (demo 64); quick 32",
)
@click.option(
    "--test-per-client", type=int, default=None, help="0: the whole test split (default; quick 32)"
)
@click.option(
    "--round-eval-examples",
    type=int,
    default=None,
    help="test records per client scored after each round before the last (default 64)",
)
@click.option(
    "--generalization-examples",
    type=int,
    default=None,
    help="test records per (client, other task) for the generalization column (default 32)",
)
@click.option(
    "--validation",
    type=int,
    default=None,
    help="records held out of training to choose settings on: per task for a FLAN folder, "
    "per client for the demo (default 60; quick 24)",
)
@click.option(
    "--learning-rate", type=float, default=None, help="default: FEDVEC_LEARNING_RATE (1e-3)"
)
@click.option("--max-length", default=128, show_default=True, help="tokens per (prompt, option)")
@click.option(
    "--group-threshold",
    type=float,
    default=None,
    help="a fixed grouping threshold for the grouping strategies instead of the "
    "one chosen on validation; <= -1: one group of all clients, the paper's setting",
)
@click.option(
    "--quick",
    is_flag=True,
    help="one seed, 2 rounds, small subsets: every strategy in under 10 minutes",
)
@click.option("--out", "out_dir", default=None, help="report folder (default: FEDVEC_HOME/bench)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def bench_quality(
    ctx: click.Context,
    dataset: str,
    data_dir: str | None,
    shards: int,
    demo_clients: int | None,
    strategies: str | None,
    rounds: int | None,
    epochs: int | None,
    seeds: str | None,
    train_per_client: int | None,
    test_per_client: int | None,
    round_eval_examples: int | None,
    generalization_examples: int | None,
    validation: int | None,
    learning_rate: float | None,
    max_length: int,
    group_threshold: float | None,
    quick: bool,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Personalized accuracy (and balanced accuracy), generalization and the new-client
    scenario of every strategy, through the real service on the same clients, seeds and
    budget; writes report.md, results.csv and plots to --out.

    Settings are chosen on validation records cut from the training data, never on the
    test split: the grouping threshold, relative to the observed similarities, and the
    task of the client that enrolls late. A run interrupted part-way resumes: rerun the
    same command and the (seed, strategy) runs stored under --out/results are reused."""
    from services.bench.quality import QUICK, BenchPlan, run_quality_bench

    base = QUICK if quick else BenchPlan()
    settings = settings_of(ctx).replace(max_length=max_length)
    if learning_rate is not None:
        settings = settings.replace(learning_rate=learning_rate)
    if group_threshold is not None:
        settings = settings.replace(group_threshold=group_threshold)
    plan = plan_with(
        base,
        dataset=dataset,
        shards=shards,
        data_dir=data_dir,
        demo_clients=demo_clients,
        rounds=rounds,
        epochs=epochs,
        train_per_client=train_per_client,
        round_eval_examples=round_eval_examples,
        generalization_examples=generalization_examples,
        validation=validation,
        strategies=names(strategies),
        seeds=tuple(int(x) for x in names(seeds)) if seeds else None,
        test_per_client=test_per_client,
        calibrate_threshold=False if group_threshold is not None else None,
    )
    if plan.test_per_client == 0:  # the whole test split, which the plan spells None
        plan = dataclasses.replace(plan, test_per_client=None)
    if plan.dataset == "demo" and plan.test_per_client is None:
        plan = dataclasses.replace(plan, test_per_client=64)  # demo data: no fixed test split
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "quality"
    summary = run_quality_bench(
        settings,
        plan,
        out.resolve(),
        echo=echo_for(as_json),
        command="fedvec " + " ".join(sys.argv[1:]),
    )
    if as_json:
        echo_json(summary)


@bench.command("latency")
@click.option("--updates", default=60, show_default=True, help="asynchronous updates to send")
@click.option("--clients", default=4, show_default=True)
@click.option("--workers", default=2, show_default=True, help="worker processes to start")
@click.option("--max-steps", default=2, show_default=True, help="LoRA steps per update")
@click.option("--out", "out_dir", default=None, help="folder for data and logs")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def bench_latency(
    ctx: click.Context,
    updates: int,
    clients: int,
    workers: int,
    max_steps: int,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Time from `update.stored` to the client's new personalized adapter, on Redis +
    PostgreSQL + S3 with real worker and aggregator processes (p50/p95 over UPDATES).

    Uses FEDVEC_DATABASE_URL, FEDVEC_BROKER_URL and FEDVEC_S3_* when set; otherwise a
    fresh database on the local PostgreSQL, the local Redis and moto's S3 server."""
    import tempfile

    from services.bench.latency import run_latency_bench

    settings = settings_of(ctx).replace(
        max_steps=max_steps, batch_size=4, max_length=48, torch_threads=1
    )
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedvec-bench-"))
    result = run_latency_bench(
        settings,
        updates=updates,
        clients=clients,
        workers=workers,
        out_dir=out.resolve(),
        echo=echo_for(as_json),
    )
    if as_json:
        echo_json(result)


@bench.command("worker")
@click.option("--quick", is_flag=True, help="2 steps, 1 repeat, adapters up to 8 MiB: under 2 min")
@click.option("--steps", type=int, default=None, help="LoRA steps per fine-tune (default 8)")
@click.option("--repeats", type=int, default=None, help="timed runs of each kind (default 5)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@click.pass_context
def bench_worker(
    ctx: click.Context,
    quick: bool,
    steps: int | None,
    repeats: int | None,
    device: str,
    as_json: bool,
) -> None:
    """Worker overhead: a bare transformers+peft loop against fedvec's Celery train task
    (a real worker process) on the same data, steps and seed; adapter upload and download
    through fedvec against raw minio on moto's S3 server; GPU samples/s and peak memory."""
    from services.bench.worker import plan_for, run_worker_bench

    plan = plan_for(quick=quick, steps=steps, repeats=repeats, device=device)
    result = run_worker_bench(
        settings_of(ctx),
        plan,
        echo=echo_for(as_json),
        command="fedvec " + " ".join(sys.argv[1:]),
    )
    if as_json:
        echo_json(result)


@bench.command("peer")
@click.option("--quick", is_flag=True, help="2 clients, 2 rounds, small splits: about a minute")
@click.option("--rounds", type=int, default=None, help="default 5; quick 2")
@click.option("--clients", type=int, default=None, help="how many clients (default 6; quick 2)")
@click.option("--train-per-client", type=int, default=None, help="default 64; quick 8")
@click.option("--test-per-client", type=int, default=None, help="default 128; quick 16")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dataset",
    type=click.Choice(["auto", "flan8", "demo"]),
    default="auto",
    show_default=True,
    help="auto: flan8 when its folder is there, else demo",
)
@click.option(
    "--out", "out_dir", default=None, help="folder for the runs (default: FEDVEC_HOME/bench/peer)"
)
@click.option("--profile", is_flag=True, help="py-spy on fedvec's processes during rounds 2..R")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def bench_peer(
    ctx: click.Context,
    quick: bool,
    rounds: int | None,
    clients: int | None,
    train_per_client: int | None,
    test_per_client: int | None,
    seed: int,
    dataset: str,
    out_dir: str | None,
    profile: bool,
    as_json: bool,
) -> None:
    """The same MiniLM + LoRA FedAvg run in Flower's simulation and in fedvec's synchronous
    mode (same clients, rounds, steps and seed): seconds per round and final accuracy side
    by side. Needs the bench extra (flwr[simulation]). About 8 minutes; --quick about one."""
    from services.bench.peer import QUICK, PeerPlan, run_peer_bench

    plan = plan_with(
        QUICK if quick else PeerPlan(),
        seed=seed,
        dataset=dataset,
        profile=profile,
        rounds=rounds,
        clients=clients,
        train_per_client=train_per_client,
        test_per_client=test_per_client,
    )
    settings = settings_of(ctx)
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "peer"
    result = run_peer_bench(settings, plan, out.resolve(), echo=echo_for(as_json))
    if as_json:
        echo_json(result)


@bench.command("scale")
@click.option("--quick", is_flag=True, help="small grid (N 100, 1000; d 74k, 262k): under 2 min")
@click.option("--clients", default=None, help="comma-separated N (default 100,1000,10000)")
@click.option("--dims", default=None, help="comma-separated d (default 74000,1000000,4200000)")
@click.option("--sketch-dim", type=int, default=None, help="sketch size k (default 20480)")
@click.option("--peers", type=int, default=None, help="peers m in an aggregate (default 8)")
@click.option("--threads", type=int, default=None, help="torch threads for the math (default 1)")
@click.option(
    "--service-db",
    type=click.Choice(["postgres", "sqlite", "none"]),
    default="postgres",
    show_default=True,
    help="database of the service part (Aggregator.handle per event at each N); postgres: "
    "a scratch database on 127.0.0.1:5432, dropped afterwards",
)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@click.pass_context
def bench_scale(
    ctx: click.Context,
    quick: bool,
    clients: str | None,
    dims: str | None,
    sketch_dim: int | None,
    peers: int | None,
    threads: int | None,
    service_db: str,
    as_json: bool,
) -> None:
    """Aggregator cost per update at N clients × d parameters with the sketch index, against
    the naive exact row; sketch error and group agreement against exact similarity.
    Synthetic task vectors with planted groups; then the service's own cost per update event
    (Aggregator.handle on a real database) at each N. The full run takes about 7 min on 2
    cores."""
    from services.bench.scale import QUICK, ScalePlan, run_scale_bench

    def ints(text: str | None) -> tuple[int, ...] | None:
        return tuple(int(x.replace("_", "")) for x in names(text)) if text else None

    plan = plan_with(
        QUICK if quick else ScalePlan(),
        service_db=service_db,
        clients=ints(clients),
        dims=ints(dims),
        k=sketch_dim,
        peers=peers,
        threads=threads,
    )
    echo = echo_for(as_json)
    summary = run_scale_bench(plan, echo, show=not as_json, settings=settings_of(ctx))
    if as_json:
        echo_json(summary)


@bench.command("soak")
@click.option("--clients", type=int, default=None, help="clients (default 1000; quick 200)")
@click.option("--minutes", type=float, default=None, help="sending time (default 10; quick 1)")
@click.option("--rate", type=float, default=None, help="updates per second (default 5)")
@click.option("--quick", is_flag=True, help="200 clients for 1 minute: the CI version")
@click.option("--out", "out_dir", default=None, help="folder for the aggregator's log")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def bench_soak(
    ctx: click.Context,
    clients: int | None,
    minutes: float | None,
    rate: float | None,
    quick: bool,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Clients with small synthetic task vectors push signed updates through Redis +
    PostgreSQL + S3 to a real aggregator process at a fixed rate (2 % planted bad ones);
    prints updates in, aggregated, superseded, rejected, quarantined, failed, pending and
    lost, latency, throughput, and the aggregator's memory after warm-up and at the end.
    Exits 1 when an update was lost or a planted bad one was not rejected.

    Uses FEDVEC_DATABASE_URL, FEDVEC_BROKER_URL and FEDVEC_S3_* when set; otherwise a
    fresh database on the local PostgreSQL, the local Redis and moto's S3 server."""
    import tempfile

    from services.bench.soak import QUICK, SoakPlan, run_soak

    plan = plan_with(QUICK if quick else SoakPlan(), clients=clients, minutes=minutes, rate=rate)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedvec-soak-"))
    result = run_soak(
        settings_of(ctx),
        plan,
        out_dir=out.resolve(),
        echo=echo_for(as_json),
        show=not as_json,
    )
    if as_json:
        echo_json(result)
    if result["lost"] or not result["planted_bad_rejected"]:
        sys.exit(1)


@bench.command("poison")
@click.option("--quick", is_flag=True, help="4 honest clients, 1 round of 1 step: about 1 min")
@click.option("--honest", type=int, default=None, help="honest clients (default 10; quick 4)")
@click.option("--rounds", type=int, default=None, help="synchronous rounds (default 2; quick 1)")
@click.option("--train-per-client", type=int, default=None, help="default 32; quick 8")
@click.option("--test-per-client", type=int, default=None, help="default 32; quick 8")
@click.option("--strategies", default=None, help="comma-separated (default fedbip)")
@click.option("--attacks", default=None, help="comma-separated: scaled, flipped (default both)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out", "out_dir", default=None, help="folder for the runs (default: FEDVEC_HOME/bench/poison)"
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def bench_poison(
    ctx: click.Context,
    quick: bool,
    honest: int | None,
    rounds: int | None,
    train_per_client: int | None,
    test_per_client: int | None,
    strategies: str | None,
    attacks: str | None,
    seed: int,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Honest clients' personalized accuracy with a poisoned client among them (an honest
    client's τ ×50, or sign-flipped), screening on and off, against the honest clients
    alone: real model, demo data, the worker's training and evaluation and the aggregator
    on the embedded backend; prints whether the honest adapters stay bit-identical with
    screening on. 5-10 minutes on 2 CPU cores per strategy; --quick under a minute."""
    from services.bench.poison import QUICK, PoisonPlan, run_poison_bench

    plan = plan_with(
        QUICK if quick else PoisonPlan(),
        seed=seed,
        honest=honest,
        rounds=rounds,
        train_per_client=train_per_client,
        test_per_client=test_per_client,
        strategies=names(strategies),
        attacks=names(attacks),
    )
    settings = settings_of(ctx)
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "poison"
    result = run_poison_bench(
        settings,
        plan,
        out.resolve(),
        echo=echo_for(as_json),
        show=not as_json,
    )
    if as_json:
        echo_json(result)
