"""What the command modules share: the settings in the click context, JSON and progress
output, the Celery sender, and the database checks a command makes before it starts."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

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


UNREACHABLE_EXIT = 3  # a service (database, broker, object store) could not be reached


def unreachable(exc: BaseException, settings: Settings) -> str | None:
    """One line for a database, broker or object store that cannot be reached: which one,
    where (host:port, never a password), the setting to check and the driver's first
    line. None: not such a failure (a bug keeps its traceback)."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    from services.object_store import TransientStoreError

    if isinstance(exc, BrokerError | RedisConnectionError):
        parts = urlsplit(settings.resolved_broker_url)
        where, what, setting = f"{parts.hostname}:{parts.port or 6379}", "broker", "BROKER_URL"
    elif isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        url = make_url(settings.resolved_database_url)
        if url.get_backend_name() == "sqlite":
            where = url.database or ""
        else:
            where = f"{url.host}:{url.port or ''}"
        what, setting = "database", "DATABASE_URL"
    elif isinstance(exc, TransientStoreError):
        where, what, setting = settings.s3_endpoint, "object store", "S3_ENDPOINT"
    else:
        return None
    cause = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    first = lines[0] if lines else type(cause).__name__
    return f"{what} unreachable at {where} (check FEDVEC_{setting}): {first}"
