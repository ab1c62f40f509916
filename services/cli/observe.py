"""Observing: evaluate clients, the status (once or --watch), the groups."""

from __future__ import annotations

import signal
import time

import click

from services import operations as ops
from services.cli.common import (
    check_db,
    echo_json,
    sender,
    settings_of,
)
from services.console import table
from services.status import StatusSource, frame_json, render_status


@click.command()
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
    settings = settings_of(ctx)
    check_db(settings)
    chosen = ops.resolve_clients(settings, clients, all_)
    rows = ops.evaluate(
        settings,
        chosen,
        sender(settings),
        max_examples=max_examples,
        timeout=timeout,
        show=not as_json,
        failures_ok=True,
    )
    failed = [r for r in rows if r["reason"] is not None]
    if as_json:
        echo_json(rows)
    else:
        click.echo(
            table(
                [
                    [
                        r["client"],
                        r["adapter_version"],
                        "failed" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                        "-" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.3f}",
                        r["num_examples"],
                    ]
                    for r in rows
                ],
                ["client", "version", "accuracy", "balanced accuracy", "examples"],
            )
        )
        for r in failed:
            click.echo(f"client {r['client']}: evaluation failed: {r['reason']}", err=True)
    if failed:
        ctx.exit(1)  # as `train` when an update failed


def _watch_status(
    source: StatusSource, *, interval: float, count: int | None, as_json: bool
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
                click.echo(frame_json(frame))
            else:
                total = f"/{count}" if count else ""
                text = render_status(frame, f"({every}, frame {n}{total}; Ctrl-C to stop)")
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


@click.command()
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
    settings = settings_of(ctx)
    if not watch:
        frame = StatusSource(settings, strict=True).collect()
        if as_json:
            echo_json(frame["status"])
        else:
            click.echo(render_status(frame))
        return
    source = StatusSource(settings, strict=False)
    _watch_status(source, interval=interval, count=count, as_json=as_json)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def groups(ctx: click.Context, as_json: bool) -> None:
    """The latest client groups (which clients' updates are aggregated together)."""
    settings = settings_of(ctx)
    check_db(settings)
    data = ops.groups(settings)
    if as_json:
        echo_json(data)
        return
    if data["version"] is None:
        click.echo("no groups yet: they are formed at the first aggregation")
        return
    click.echo(
        f"grouping version {data['version']} ({data['strategy']}, threshold {data['threshold']})"
    )
    for g in data["groups"]:
        click.echo(f"  group {g['group']}: {', '.join(g['clients'])}")
    for o in data["outside"]:
        click.echo(f"  in no group: {o['client']} ({o['why']})")
