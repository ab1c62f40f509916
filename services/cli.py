"""`fedvec`: the admin CLI. Every command reads settings from FEDVEC_* variables or `.env`
(see README); `--json` prints machine-readable output for scripts."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from services import operations as ops
from services.settings import Settings, load_settings
from services.tables import table as _table

T = TypeVar("T")


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _send(settings: Settings):  # noqa: ANN202 - celery's send_task
    from services.celery_app import make_app

    return make_app(settings).send_task


def _check_db(settings: Settings) -> None:
    from services.db import check_schema

    check_schema(settings.resolved_database_url)


def _when_reachable(settings: Settings, start: Callable[[], T], what: str) -> T:
    """A long-running service's start-up step, retried while the database or the object
    store is unreachable (FEDVEC_STARTUP_TIMEOUT), instead of exiting at once."""
    from services.transient import wait_until_reachable

    try:
        return wait_until_reachable(
            start,
            what,
            timeout=settings.startup_timeout,
            backoff_max=min(settings.retry_backoff_max, 10.0),
            log=logging.getLogger("fedvec.startup"),
        )
    except TimeoutError as exc:
        raise ops.OperationError(str(exc)) from None


class FedvecGroup(click.Group):
    """Turns expected refusals into one readable line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        from services.db import SchemaNotReady

        try:
            return super().invoke(ctx)
        except (ops.OperationError, SchemaNotReady, ValueError, FileNotFoundError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=FedvecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default: FEDVEC_LOG_LEVEL)")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """fedvec: personalized federated fine-tuning by task-vector aggregation.

    Clients fine-tune a LoRA adapter of a shared model on their private data; the
    aggregator compares clients by their task vectors and gives each client its own
    aggregate of the clients that resemble it.

    Typical session: `fedvec db upgrade`, `fedvec enroll NAME --data train.jsonl
    --test test.jsonl`, start `fedvec worker` and `fedvec aggregator`, then
    `fedvec train --all --rounds 3`, `fedvec status`, `fedvec export NAME DIR`.
    Or just `fedvec demo`.
    """
    settings = load_settings()
    logging.basicConfig(
        level=(log_level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # one line per command is enough from these libraries
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    ctx.obj = {"settings": settings}


# --- db --------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the database schema to REVISION."""
    from services.db import current_revision, redact_url, upgrade

    url = _settings(ctx).resolved_database_url
    logging.getLogger("alembic").setLevel(logging.INFO)
    upgrade(url, revision)
    click.echo(f"database {redact_url(url)} at revision {current_revision(url)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Show the database's schema revision and the code's."""
    from services.db import current_revision, head_revision

    url = _settings(ctx).resolved_database_url
    click.echo(f"database: {current_revision(url) or 'none'}  code: {head_revision()}")


# --- clients ---------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.option(
    "--data", "data", required=True, type=click.Path(), help="training data (.jsonl/.json)"
)
@click.option("--test", "test", type=click.Path(), help="test split, for `fedvec evaluate`")
@click.option("--task", default="", help="task label shown in tables (default: data folder name)")
@click.option(
    "--site", default="default", show_default=True, help="site whose workers hold the data"
)
@click.option("--json", "as_json", is_flag=True, help="print the client as JSON")
@click.pass_context
def enroll(
    ctx: click.Context, name: str, data: str, test: str | None, task: str, site: str, as_json: bool
) -> None:
    """Enroll client NAME with its training data file.

    Records: {"prompt": ..., "options": [...], "answer": ...} (JSON lines or a JSON list),
    or FLAN records with an OPTIONS: list. The file is checked before anything is
    written; the data stays where it is (workers of SITE read it).

    The client gets a secret, printed once and added to FEDVEC_CLIENT_SECRETS_FILE: a
    worker signs the client's updates with it, and the aggregator refuses updates that
    are not signed by the client's secret (the database keeps only a hash of it)."""
    settings = _settings(ctx)
    _check_db(settings)
    row = ops.enroll(settings, name, data, test=test, task=task, site=site)
    if as_json:
        _echo_json(row)
    else:
        click.echo(f"enrolled {row['name']} (id {row['id']}, {row['num_examples']} examples)")
        # the only time the secret is shown: the database keeps a hash of it
        click.echo(f"secret (shown once): {row['secret']}")
        click.echo(
            f"added to {row['secrets_file']}; the workers of site {row['site']!r} need it "
            "in their FEDVEC_CLIENT_SECRETS_FILE to train this client"
        )
        if row["policy_file"]:
            click.echo(
                f"object-store policy (its own prefix only): {row['policy_file']}; apply it "
                "with MinIO's `mc admin policy` (README: Reliability and security)"
            )


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def clients(ctx: click.Context, as_json: bool) -> None:
    """List enrolled clients."""
    settings = _settings(ctx)
    _check_db(settings)
    rows = ops.list_clients(settings)
    if as_json:
        _echo_json(rows)
        return
    click.echo(
        _table(
            [
                [
                    r["id"],
                    r["name"],
                    r["task"],
                    r["site"],
                    r["num_examples"],
                    r["num_test_examples"],
                ]
                for r in rows
            ],
            ["id", "name", "task", "site", "train", "test"],
        )
    )


# --- training --------------------------------------------------------------------------
@cli.command()
@click.argument("clients", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every enrolled client")
@click.option("--rounds", default=1, show_default=True, help="synchronous rounds to run")
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
    until the aggregator has published every participant's personalized adapter."""
    from schema.events import TrainRequest

    settings = _settings(ctx)
    _check_db(settings)
    chosen = ops.resolve_clients(settings, clients, all_)
    send = _send(settings)
    if async_:
        for c in chosen:
            ops.send_train(send, TrainRequest(client_id=c.id), site=c.site)
        click.echo(f"sent {len(chosen)} asynchronous training requests")
        return
    if rounds > 1 and not wait:
        raise ops.OperationError("--no-wait runs a single round")
    summaries = []
    for _ in range(rounds):
        round_id = ops.start_round(settings, chosen, send)
        if not wait:
            click.echo(f"round {round_id} started with {len(chosen)} clients")
            return
        ops.wait_round(settings, round_id, timeout=timeout, show=not as_json)
        summary = ops.round_summary(settings, round_id)
        summaries.append(summary)
        if not as_json:
            failed = summary["failed"]
            click.echo(
                f"round {round_id}: {summary['updates']}"
                + (f" problems: {failed}" if failed else "")
            )
    if as_json:
        _echo_json(summaries)


@cli.command()
@click.argument("clients", nargs=-1)
@click.option("--all", "all_", is_flag=True)
@click.option("--max-examples", default=0, help="score only the first N test examples")
@click.option("--timeout", default=1800.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def evaluate(
    ctx: click.Context,
    clients: tuple[str, ...],
    all_: bool,
    max_examples: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Score each client's personalized adapter on its test split (runs on the workers)."""
    settings = _settings(ctx)
    _check_db(settings)
    chosen = ops.resolve_clients(settings, clients, all_)
    rows = ops.evaluate(
        settings,
        chosen,
        _send(settings),
        max_examples=max_examples,
        timeout=timeout,
        show=not as_json,
    )
    if as_json:
        _echo_json(rows)
        return
    click.echo(
        _table(
            [
                [r["client"], r["adapter_version"], f"{r['accuracy']:.3f}", r["num_examples"]]
                for r in rows
            ],
            ["client", "version", "accuracy", "examples"],
        )
    )


# --- inspection ------------------------------------------------------------------------
UPDATE_STATUSES = ("stored", "aggregated", "superseded", "rejected", "quarantined", "failed")
log = logging.getLogger("fedvec.cli")


def _one_line(what: str, exc: BaseException) -> str:
    """`WHAT unreachable: <first line of the driver's message>` (SQLAlchemy's own message
    carries the SQL and a documentation link)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return f"{what} unreachable: {lines[0] if lines else type(orig).__name__}"


class _StatusSource:
    """Collects status frames for `fedvec status`, one-shot or --watch.

    strict (one-shot): a database that is unreachable or not migrated is an error (exit 2).
    Otherwise (--watch) the frame carries the error and the next frame tries again. The
    broker is never an error: its queue depths are then unknown ('?')."""

    def __init__(self, settings: Settings, *, strict: bool) -> None:
        self.settings = settings
        self.strict = strict
        self.app: Any = None  # made at the first look at the broker
        self.sites: list[str] = []  # the last known, for the queue list in an outage
        self.frames = 0
        self._aggregated: int | None = None  # at the previous frame with data
        self._at = 0.0

    def collect(self) -> dict[str, Any]:
        from services.db import check_schema

        started = time.monotonic()
        self.frames += 1
        frame: dict[str, Any] = {
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
            "frame": self.frames,
            "error": None,
            "broker_error": None,
            "summary": None,
            "status": None,
        }
        try:
            check_schema(self.settings.resolved_database_url)
            self.sites = [c["site"] for c in ops.list_clients(self.settings)]
        except Exception as exc:
            frame["error"] = self._db_error(exc)
        frame["queues"], frame["broker_error"] = self._queue_depths()
        if frame["error"] is None:
            try:
                frame["status"] = ops.status(self.settings, frame["queues"])
            except Exception as exc:
                frame["error"] = self._db_error(exc)
        if frame["status"] is not None:
            frame["summary"] = self._summary(frame["status"], started)
        return frame

    def _db_error(self, exc: Exception) -> str:
        from sqlalchemy.exc import SQLAlchemyError

        from services.db import SchemaNotReady, redact_url

        if isinstance(exc, SchemaNotReady):
            if self.strict:
                raise exc
            return f"database not ready: {exc}"
        if isinstance(exc, SQLAlchemyError | OSError):
            url = redact_url(self.settings.resolved_database_url)
            message = f"{_one_line('database', exc)} ({url})"
            if self.strict:
                raise ops.OperationError(message) from None
            return message
        if self.strict:
            raise exc
        log.debug("status frame failed", exc_info=True)
        return f"status failed: {type(exc).__name__}: {exc}"

    def _queue_depths(self) -> tuple[dict[str, int | None], str | None]:
        from services.celery_app import make_app, queue_depths, queues_for_sites

        if self.app is None:
            self.app = make_app(self.settings)
        queues = queues_for_sites(self.sites)
        try:  # one quick try: queue_depths alone retries for seconds on a dead broker
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        except Exception as exc:
            return {q: None for q in queues}, _one_line("broker", exc)
        return queue_depths(self.app, queues), None

    def _summary(self, data: dict[str, Any], started: float) -> dict[str, Any]:
        counts = {s: 0 for s in UPDATE_STATUSES} | {k: int(v) for k, v in data["updates"].items()}
        since = rate = None
        if self._aggregated is not None:
            since = counts["aggregated"] - self._aggregated
            elapsed = started - self._at
            rate = round(since / elapsed, 3) if elapsed > 0 else None
        self._aggregated, self._at = counts["aggregated"], started
        return {
            "updates": counts,
            "aggregated_since_last_frame": since,
            "aggregated_per_s": rate,
            "grouping_version": data["groups"]["version"],
        }


def _render_status(frame: dict[str, Any], header: str | None = None) -> str:
    """One frame as text. Without header: what one-shot `fedvec status` always printed."""
    lines = []
    if header is not None:
        lines.append(f"fedvec status  {frame['time']}  {header}")
    if frame["error"]:
        lines.append(frame["error"])
    data, summary = frame["status"], frame["summary"]
    if header is not None and summary is not None:
        since = summary["aggregated_since_last_frame"]
        rate = summary["aggregated_per_s"]
        lines.append(
            "updates: "
            + ", ".join(f"{s} {n}" for s, n in summary["updates"].items())
            + " | aggregated since last frame: "
            + ("-" if since is None else f"{since} ({rate if rate is not None else '-'}/s)")
            + f" | grouping version {summary['grouping_version'] or '-'}"
        )
    if data is not None:
        group_of = {c: g["group"] for g in data["groups"]["groups"] for c in g["clients"]}
        rows = []
        for r in data["clients"]:
            last = r["last_update"] or {}
            rows.append(
                [
                    r["client"],
                    r["site"],
                    r["personalized_version"],
                    group_of.get(r["client"], "-"),
                    last.get("status", "-"),
                    last.get("at", "-")[:19],
                    last.get("reason") or "",
                ]
            )
        lines.append(
            f"strategy {data['strategy']}; updates {data['updates']}; "
            f"last round {data['last_round']}"
        )
        lines.append(
            _table(rows, ["client", "site", "version", "group", "last update", "at", "note"])
        )
    queues = "queues: " + ", ".join(
        f"{q}={'?' if n is None else n}" for q, n in frame["queues"].items()
    )
    if frame["broker_error"]:
        queues += f" ({frame['broker_error']})"
    lines.append(queues)
    return "\n".join(lines)


def _frame_json(frame: dict[str, Any]) -> str:
    """One JSON line of `status --json --watch`; its "status" is the one-shot object."""
    keys = ("time", "frame", "error", "broker_error", "summary", "status")
    return json.dumps({k: frame[k] for k in keys}, default=str)


def _watch_status(
    source: _StatusSource, *, interval: float, count: int | None, as_json: bool
) -> None:
    tty = not as_json and click.get_text_stream("stdout").isatty()
    every = f"every {interval:g}s"
    # Ctrl-C sets a flag that the loop checks between frames, instead of raising wherever
    # the process happens to be: a KeyboardInterrupt inside the database or broker client
    # can be swallowed by its retry code, and the watch then never ends.
    stopped = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C raises KeyboardInterrupt as usual
        previous = None
    try:
        while not stopped:
            started = time.monotonic()
            frame = source.collect()
            n = frame["frame"]
            if as_json:
                click.echo(_frame_json(frame))
            else:
                total = f"/{count}" if count else ""
                text = _render_status(frame, f"({every}, frame {n}{total}; Ctrl-C to stop)")
                if tty:
                    click.clear()
                elif n > 1:
                    click.echo("")
                click.echo(text)
            if count is not None and n >= count:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
        if tty:
            click.echo("")
    except KeyboardInterrupt:
        if tty:
            click.echo("")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (with --watch: one line a frame)")
@click.option("--watch", is_flag=True, help="redraw every --interval seconds until Ctrl-C")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="seconds between --watch frames",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="stop --watch after N frames (default: until Ctrl-C)",
)
@click.pass_context
def status(
    ctx: click.Context, as_json: bool, watch: bool, interval: float, count: int | None
) -> None:
    """Clients, last update per client, groups, adapter versions, queue depths.

    With --watch, for a terminal without Grafana: the status is redrawn every --interval
    seconds until Ctrl-C (which exits with code 0), each frame headed by its time and a
    summary line: updates by status (stored, aggregated, rejected, failed), updates
    aggregated since the previous frame and their rate per second, and the latest
    grouping version. The screen is cleared between frames on a terminal; otherwise
    (a pipe, a log file) frames follow each other, separated by a blank line. A database
    or broker that goes away is shown in the frame ('database unreachable: ...', queue
    depths '?') and watching goes on. --count N stops after N frames.

    With --json --watch, one JSON object per frame and line (JSON Lines): "time",
    "frame", "error" and "broker_error" (null when none), "summary" and "status" (what
    `fedvec status --json` prints; null while the database is unreachable).

    Without --watch, a database that is unreachable or not migrated is an error (exit 2).
    """
    if not watch:
        for name in ("interval", "count"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name} goes with --watch")
    settings = _settings(ctx)
    if not watch:
        frame = _StatusSource(settings, strict=True).collect()
        if as_json:
            _echo_json(frame["status"])
        else:
            click.echo(_render_status(frame))
        return
    source = _StatusSource(settings, strict=False)
    _watch_status(source, interval=interval, count=count, as_json=as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def groups(ctx: click.Context, as_json: bool) -> None:
    """The latest client groups (which clients' updates are aggregated together)."""
    settings = _settings(ctx)
    _check_db(settings)
    data = ops.groups(settings)
    if as_json:
        _echo_json(data)
        return
    if data["version"] is None:
        click.echo("no groups yet: they are formed at the first aggregation")
        return
    click.echo(
        f"grouping version {data['version']} ({data['strategy']}, threshold {data['threshold']})"
    )
    for g in data["groups"]:
        click.echo(f"  group {g['group']}: {', '.join(g['clients'])}")


@cli.command()
@click.argument("client")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--version", type=int, default=None, help="adapter version (default: latest)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export(
    ctx: click.Context, client: str, out_dir: str, version: int | None, as_json: bool
) -> None:
    """Write CLIENT's personalized adapter as a PEFT folder (PeftModel.from_pretrained)."""
    settings = _settings(ctx)
    _check_db(settings)
    (c,) = ops.resolve_clients(settings, [client])
    info = ops.export_adapter(settings, c, Path(out_dir), version)
    if as_json:
        _echo_json(info)
    else:
        click.echo(f"wrote {info['client']} version {info['version']} to {info['path']}")


# --- processes -------------------------------------------------------------------------
@cli.command()
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
    leaves that site's machines. At start-up it waits for the database (up to
    FEDVEC_STARTUP_TIMEOUT)."""
    from services.celery_app import app, train_queue, worker_argv
    from services.metrics import serve

    settings = _settings(ctx)
    if site is not None:
        settings = settings.replace(site=site)
    if device is not None:
        settings = settings.replace(device=device)
    _when_reachable(settings, lambda: _check_db(settings), "the database")
    app.fedvec_settings = settings  # type: ignore[attr-defined]
    serve(settings.metrics_port)
    queue = train_queue(settings.site)
    click.echo(f"worker on {settings.device}, queue {queue!r}", err=True)
    app.worker_main(worker_argv(queue, name=queue, loglevel=loglevel))


@cli.command()
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

    settings = _settings(ctx)
    import torch

    if settings.torch_threads > 0:  # the math's threads; the rest of the machine is the DB's
        torch.set_num_threads(settings.torch_threads)
    click.echo(
        f"aggregator: strategy {settings.strategy}, {torch.get_num_threads()} math threads",
        err=True,
    )
    _when_reachable(settings, lambda: _check_db(settings), "the database")
    serve(settings.metrics_port)
    # start-up recovery reads both; it is idempotent, so a retry after a partial pass is safe
    _when_reachable(
        settings, lambda: get_aggregator().recover(), "the database or the object store"
    )
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


@cli.command()
@click.option(
    "--port", type=int, default=None, help="HTTP port for /metrics (default: FEDVEC_METRICS_PORT)"
)
@click.pass_context
def metrics(ctx: click.Context, port: int | None) -> None:
    """Serve database-derived gauges for Prometheus: enrolled clients, updates by status,
    personalized adapters, groups and queue depths (one exporter per deployment; workers
    and the aggregator expose their own counters on FEDVEC_METRICS_PORT)."""
    from services.metrics_exporter import run_exporter

    settings = _settings(ctx)
    _check_db(settings)
    port = port if port is not None else settings.metrics_port
    if port <= 0:
        raise ops.OperationError("give --port or FEDVEC_METRICS_PORT")
    click.echo(f"serving metrics on :{port}/metrics", err=True)
    run_exporter(settings, port)


@cli.command()
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

    settings = _settings(ctx).replace(max_length=max_length)
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
        echo=(lambda _m: None) if as_json else click.echo,
    )
    if as_json:
        _echo_json(result)


@cli.group()
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
    help="comma-separated (default: local,fedavg,fedamp_raw,fedbip,fedbip_layerwise,clustered)",
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
    help="a fixed grouping threshold for fedbip/fedbip_layerwise/clustered instead of the "
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
    import dataclasses

    from services.bench_quality import QUICK, BenchPlan, run_quality_bench

    plan = QUICK if quick else BenchPlan()
    given = {
        "data_dir": data_dir,
        "demo_clients": demo_clients,
        "rounds": rounds,
        "epochs": epochs,
        "train_per_client": train_per_client,
        "generalization_examples": generalization_examples,
        "validation": validation,
    }
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    changes.update(dataset=dataset, shards=shards)
    if strategies:
        changes["strategies"] = tuple(x.strip() for x in strategies.split(",") if x.strip())
    if seeds:
        changes["seeds"] = tuple(int(x) for x in seeds.split(",") if x.strip())
    if test_per_client is not None:
        changes["test_per_client"] = test_per_client or None
    if dataset == "demo" and changes.get("test_per_client", plan.test_per_client) is None:
        changes["test_per_client"] = 64  # the demo data has no fixed test split
    settings = _settings(ctx).replace(max_length=max_length)
    if learning_rate is not None:
        settings = settings.replace(learning_rate=learning_rate)
    if group_threshold is not None:
        settings = settings.replace(group_threshold=group_threshold)
        changes["calibrate_threshold"] = False
    plan = dataclasses.replace(plan, **changes)
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "quality"
    summary = run_quality_bench(
        settings,
        plan,
        out.resolve(),
        echo=(lambda _m: None) if as_json else click.echo,
        command="fedvec " + " ".join(sys.argv[1:]),
    )
    if as_json:
        _echo_json(summary)


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

    from services.bench_latency import run_latency_bench

    settings = _settings(ctx).replace(
        max_steps=max_steps, batch_size=4, max_length=48, torch_threads=1
    )
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedvec-bench-"))
    result = run_latency_bench(
        settings,
        updates=updates,
        clients=clients,
        workers=workers,
        out_dir=out.resolve(),
        echo=(lambda _m: None) if as_json else click.echo,
    )
    if as_json:
        _echo_json(result)


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
    from services.bench_worker import plan_for, run_worker_bench

    plan = plan_for(quick=quick, steps=steps, repeats=repeats, device=device)
    result = run_worker_bench(
        _settings(ctx),
        plan,
        echo=(lambda _m: None) if as_json else click.echo,
        command="fedvec " + " ".join(sys.argv[1:]),
    )
    if as_json:
        _echo_json(result)


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
    import dataclasses

    from services.bench_peer import QUICK, PeerPlan, run_peer_bench

    given = {
        "rounds": rounds,
        "clients": clients,
        "train_per_client": train_per_client,
        "test_per_client": test_per_client,
    }
    plan = dataclasses.replace(
        QUICK if quick else PeerPlan(),
        seed=seed,
        dataset=dataset,
        profile=profile,
        **{k: v for k, v in given.items() if v is not None},
    )
    settings = _settings(ctx)
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "peer"
    result = run_peer_bench(
        settings, plan, out.resolve(), echo=(lambda _m: None) if as_json else click.echo
    )
    if as_json:
        _echo_json(result)


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
    import dataclasses

    from services.bench_scale import QUICK, ScalePlan, run_scale_bench

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())

    plan = QUICK if quick else ScalePlan()
    changes: dict[str, Any] = {}
    if clients:
        changes["clients"] = ints(clients)
    if dims:
        changes["dims"] = ints(dims)
    if sketch_dim is not None:
        changes["k"] = sketch_dim
    if peers is not None:
        changes["peers"] = peers
    if threads is not None:
        changes["threads"] = threads
    plan = dataclasses.replace(plan, service_db=service_db, **changes)
    echo = (lambda _m: None) if as_json else click.echo
    summary = run_scale_bench(plan, echo, show=not as_json, settings=_settings(ctx))
    if as_json:
        _echo_json(summary)


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
    import dataclasses
    import tempfile

    from services.bench_soak import QUICK, SoakPlan, run_soak

    given = {"clients": clients, "minutes": minutes, "rate": rate}
    plan = dataclasses.replace(
        QUICK if quick else SoakPlan(), **{k: v for k, v in given.items() if v is not None}
    )
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedvec-soak-"))
    result = run_soak(
        _settings(ctx),
        plan,
        out_dir=out.resolve(),
        echo=(lambda _m: None) if as_json else click.echo,
        show=not as_json,
    )
    if as_json:
        _echo_json(result)
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
    import dataclasses

    from services.bench_poison import QUICK, PoisonPlan, run_poison_bench

    def names(text: str | None) -> tuple[str, ...] | None:
        return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None

    given = {
        "honest": honest,
        "rounds": rounds,
        "train_per_client": train_per_client,
        "test_per_client": test_per_client,
        "strategies": names(strategies),
        "attacks": names(attacks),
    }
    plan = dataclasses.replace(
        QUICK if quick else PoisonPlan(),
        seed=seed,
        **{k: v for k, v in given.items() if v is not None},
    )
    settings = _settings(ctx)
    out = Path(out_dir) if out_dir else settings.home_path / "bench" / "poison"
    result = run_poison_bench(
        settings,
        plan,
        out.resolve(),
        echo=(lambda _m: None) if as_json else click.echo,
        show=not as_json,
    )
    if as_json:
        _echo_json(result)


# --- maintenance -----------------------------------------------------------------------
@cli.command()
@click.option(
    "--older-than",
    "older_than",
    default="1h",
    show_default=True,
    metavar="AGE",
    help="grace period: only objects written longer ago than this (3600, 30m, 1h, 2d)",
)
@click.option("--delete", is_flag=True, help="delete the orphans (default: only list them)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def gc(ctx: click.Context, older_than: str, delete: bool, as_json: bool) -> None:
    """Find, and with --delete remove, orphaned objects in the object store.

    An orphan is an object under clients/ that no database row references: what a worker
    or aggregator killed between uploading and committing its row leaves behind. Global
    objects (the initial adapter, the adapter config) are never touched.

    Workers upload first and commit the row after, so an unreferenced object may belong to
    a task that is still running. The grace period (--older-than) keeps those: only objects
    written longer ago than AGE count as orphans. Keep it well above the longest upload.
    Each deletion checks the object and the database once more, and is logged with its key.

    Without --delete this is a dry run: it lists what would be deleted and changes nothing.
    """
    from services.gc import collect, format_bytes, format_duration, parse_duration
    from services.object_store import ObjectStoreError

    try:
        grace_s = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    settings = _settings(ctx)
    _check_db(settings)
    try:
        summary = collect(settings, grace_s, delete=delete)
    except ObjectStoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        _echo_json(summary.as_dict())
    else:
        age = format_duration(grace_s)
        click.echo(
            f"scanned {summary.scanned} objects under clients/: {summary.referenced} referenced, "
            f"{summary.fresh} unreferenced but newer than {age} (kept: may be in flight), "
            f"{len(summary.orphans)} orphans ({format_bytes(summary.orphan_bytes)})"
        )
        if summary.orphans:
            rows = [
                [o.key, format_bytes(o.size), format_duration(o.age_s)] for o in summary.orphans
            ]
            click.echo(_table(rows, ["orphan", "size", "age"]))
        if not delete:
            if summary.orphans:
                click.echo(
                    f"dry run: nothing deleted. To delete these {len(summary.orphans)} "
                    f"orphans, run: fedvec gc --older-than {older_than.strip()} --delete"
                )
            else:
                click.echo("dry run: nothing to delete")
        else:
            result = summary.result
            click.echo(
                f"deleted {len(result.deleted)} orphans ({format_bytes(summary.deleted_bytes)})"
            )
            for key, why in result.kept:
                click.echo(f"kept {key}: {why}")
            for key, err in result.failed:
                click.echo(f"failed {key}: {err}", err=True)
    if summary.result.failed:
        sys.exit(1)


def main() -> None:
    cli(prog_name="fedvec")


if __name__ == "__main__":
    main()
