"""What the command modules share: the settings in the click context, JSON and progress
output, the Celery sender, and the database checks a command makes before it starts."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from services import operations as ops
from services.console import Echo, quiet
from services.settings import Settings

T = TypeVar("T")
P = TypeVar("P")  # a benchmark plan (a dataclass)


def settings_of(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def echo_for(as_json: bool) -> Echo:
    """Progress lines for people; none under --json, where stdout holds only the JSON."""
    return quiet if as_json else click.echo


def sender(settings: Settings):  # noqa: ANN201 - celery's send_task
    from services.celery_app import make_app

    return make_app(settings).send_task


def check_db(settings: Settings) -> None:
    from services.db import check_schema

    check_schema(settings.resolved_database_url)


def names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (None when not given)."""
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def when_reachable(settings: Settings, start: Callable[[], T], what: str) -> T:
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


def plan_with(base: P, **given: Any) -> P:
    """A benchmark's plan (its defaults, or --quick's) with the options the user gave; an
    option left out (None) keeps the plan's value."""
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
