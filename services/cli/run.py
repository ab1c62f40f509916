"""Running the service: training rounds, a worker, the aggregator, the metrics exporter,
the demo."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import click

from services import operations as ops
from services.cli.common import (
    check_db,
    echo_for,
    echo_json,
    sender,
    settings_of,
    when_reachable,
)


@click.command()
@click.argument("clients", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every enrolled client")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="synchronous rounds to run",
)
@click.option(
    "--async",
    "async_",
    is_flag=True,
    help="asynchronous: no round barrier, each update is aggregated on arrival",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="wait for aggregation (needed for more than one round)",
)
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to wait per round")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def train(
    ctx: click.Context,
    clients: tuple[str, ...],
    all_: bool,
    rounds: int,
    async_: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Fine-tune CLIENTS (names or ids), or --all, for N rounds.

    A synchronous round sends one training task per client to the workers and waits
    until the aggregator has published every participant's personalized adapter. Exits 1
    when an update of a round failed or was rejected or quarantined (each is listed)."""

    settings = settings_of(ctx)
    check_db(settings)
    chosen = ops.resolve_clients(settings, clients, all_)
    send = sender(settings)
    if async_:
        for c in chosen:
            ops.send_train(send, ops.train_request(settings, c.id), site=c.site)
        click.echo(f"sent {len(chosen)} asynchronous training requests")
        return
    if rounds > 1 and not wait:
        raise ops.OperationError("--no-wait runs a single round")
    summaries = []
    round_id: int | None = None
    try:
        for i in range(rounds):
            round_id = ops.start_round(settings, chosen, send)
            if not wait:
                click.echo(f"round {round_id} started with {len(chosen)} clients")
                return
            if i == 0 and not as_json:
                click.echo(
                    f"round {round_id}: {len(chosen)} training requests sent (a worker's first "
                    "task also loads the model, up to a minute on a CPU)",
                    err=True,
                )
            ops.wait_round(settings, round_id, timeout=timeout, show=not as_json)
            summary = ops.round_summary(settings, round_id)
            summaries.append(summary)
            if not as_json:
                click.echo(ops.describe_round(summary))
    except KeyboardInterrupt:
        which = (
            f"round {round_id}'s training requests are sent and"
            if round_id is not None
            else "the training requests already sent are"
        )
        click.echo(
            f"\ninterrupted: {which} not recalled: the "
            "workers finish them and the aggregator publishes the round without this "
            "command. Follow it with `fedvec status --watch`.",
            err=True,
        )
        sys.exit(130)
    if as_json:
        echo_json(summaries)
    if any(summary["failed"] for summary in summaries):
        sys.exit(1)  # some updates failed or were refused: their lines above say why


@click.command()
@click.option(
    "--site",
    default=None,
    help="consume only this site's queue (clients enrolled with --site SITE); "
    "default: FEDVEC_SITE, else the shared pool",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: FEDVEC_DEVICE)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, site: str | None, device: str | None, loglevel: str) -> None:
    """Run a training worker: fine-tunes and evaluates clients, one task at a time, with
    the model loaded once per process. Run one per GPU (`--device cuda:N`).

    A worker serves either the shared pool or one site: a client enrolled with
    `--site SITE` is only ever trained by `fedvec worker --site SITE`, so its data never
    leaves that site's machines. A worker reads and writes no database: what it needs comes
    in each request and what it did goes back as a signed report through the broker (so a
    site holds no server credentials). At start-up it waits for the object store (up to
    FEDVEC_STARTUP_TIMEOUT)."""
    from services.celery_app import app, train_queue, worker_argv
    from services.metrics import serve

    settings = settings_of(ctx)
    if site is not None:
        settings = settings.replace(site=site)
    if device is not None:
        settings = settings.replace(device=device)
    from services.adapter_store import ADAPTER_CONFIG_KEY
    from services.context import object_store

    when_reachable(
        settings, lambda: object_store(settings).exists(ADAPTER_CONFIG_KEY), "the object store"
    )
    app.fedvec_settings = settings  # type: ignore[attr-defined]
    serve(settings.metrics_port)
    queue = train_queue(settings.site)
    click.echo(f"worker on {settings.device}, queue {queue!r}", err=True)
    app.worker_main(worker_argv(queue, name=queue, loglevel=loglevel))


@click.command()
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def aggregator(ctx: click.Context, loglevel: str) -> None:
    """Run the aggregator (the one consumer of update events).

    At start-up it waits for the database and the object store (up to
    FEDVEC_STARTUP_TIMEOUT), aggregates what a crash or a lost event left stored, then
    consumes events; every FEDVEC_RECOVER_INTERVAL it picks up updates whose event never
    came."""
    from aggregator.tasks import get_aggregator
    from services.celery_app import AGGREGATE_QUEUE, app, worker_argv
    from services.metrics import serve

    settings = settings_of(ctx)
    import torch

    if settings.torch_threads > 0:  # the math's threads; the rest of the machine is the DB's
        torch.set_num_threads(settings.torch_threads)
    click.echo(
        f"aggregator: strategy {settings.strategy}, {torch.get_num_threads()} math threads",
        err=True,
    )
    when_reachable(settings, lambda: check_db(settings), "the database")
    serve(settings.metrics_port)
    # start-up recovery reads both; it is idempotent, so a retry after a partial pass is safe
    when_reachable(settings, lambda: get_aggregator().recover(), "the database or the object store")
    if settings.recover_interval > 0:
        threading.Thread(
            target=_recover_forever,
            args=(settings.recover_interval,),
            name="fedvec-recover",
            daemon=True,
        ).start()
    app.worker_main(worker_argv(AGGREGATE_QUEUE, name="aggregate", loglevel=loglevel))


def _recover_forever(interval: float) -> None:
    """Beside the event consumer: updates whose event will never come still get aggregated
    (handling takes the database lock, so this and the consumer never interleave)."""
    from aggregator.tasks import get_aggregator

    log = logging.getLogger("aggregator.recover")
    while True:
        time.sleep(interval)
        try:
            get_aggregator().recover(older_than_s=interval)
        except Exception as exc:  # noqa: BLE001 - the store or database may be down: next time
            log.warning("recovery pass failed, next in %.0fs: %s", interval, exc)


@click.command()
@click.option(
    "--port", type=int, default=None, help="HTTP port for /metrics (default: FEDVEC_METRICS_PORT)"
)
@click.pass_context
def metrics(ctx: click.Context, port: int | None) -> None:
    """Serve database-derived gauges for Prometheus: enrolled clients, updates by status,
    personalized adapters, groups and queue depths (one exporter per deployment; workers
    and the aggregator expose their own counters on FEDVEC_METRICS_PORT)."""
    from services.metrics_exporter import run_exporter

    settings = settings_of(ctx)
    check_db(settings)
    port = port if port is not None else settings.metrics_port
    if port <= 0:
        raise ops.OperationError("give --port or FEDVEC_METRICS_PORT")
    click.echo(f"serving metrics on :{port}/metrics", err=True)
    run_exporter(settings, port)


@click.command()
@click.option("--dataset", type=click.Choice(["demo", "flan8"]), default="demo", show_default=True)
@click.option(
    "--strategies",
    default="fedbip,local,fedavg",
    show_default=True,
    help="comma-separated; the first is the main one",
)
@click.option("--rounds", default=3, show_default=True)
@click.option("--train-per-client", default=64, show_default=True)
@click.option("--test-per-client", default=64, show_default=True)
@click.option(
    "--max-length", default=64, show_default=True, help="tokens per (prompt, option) pair"
)
@click.option(
    "--learning-rate", type=float, default=None, help="default: FEDVEC_LEARNING_RATE (1e-3)"
)
@click.option(
    "--out", "out_dir", default=None, help="folder for the runs (default: FEDVEC_HOME/demo)"
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def demo(
    ctx: click.Context,
    dataset: str,
    strategies: str,
    rounds: int,
    train_per_client: int,
    test_per_client: int,
    max_length: int,
    learning_rate: float | None,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Run the whole loop on real data: enroll clients, start a worker and the aggregator,
    run synchronous rounds per strategy, evaluate, print a per-client table."""
    from services.demo import run_demo

    settings = settings_of(ctx).replace(max_length=max_length)
    if learning_rate is not None:
        settings = settings.replace(learning_rate=learning_rate)
    result = run_demo(
        settings,
        dataset=dataset,
        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
        rounds=rounds,
        train_per_client=train_per_client,
        test_per_client=test_per_client,
        out_dir=Path(out_dir) if out_dir else settings.home_path / "demo",
        echo=echo_for(as_json),
    )
    if as_json:
        echo_json(result)
