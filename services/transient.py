"""Which failures are worth retrying: the database or the object store being briefly
unreachable or busy, as opposed to bad input, which fails the same way every time."""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from services.object_store import TransientStoreError

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """True for lost or refused connections, timeouts and busy servers."""
    if isinstance(exc, TransientStoreError | ConnectionError | TimeoutError):
        return True
    if "sqlalchemy" not in sys.modules:  # a worker: it has no database, nor its errors
        return False
    from sqlalchemy import exc as sa_exc

    # OperationalError: connection lost or refused, server shutting down, SQLite locked
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return False


def backoff_seconds(retries: int, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: 1, 2, 4, ... seconds up to `maximum`, each drawn
    from [half, full] so that workers that failed together do not retry together."""
    full = min(float(maximum), 2.0 ** max(retries, 0))
    return (rng or random).uniform(full / 2, full)


def wait_until_reachable(
    start: Callable[[], T],
    what: str,
    *,
    timeout: float,
    backoff_max: float,
    log: logging.Logger,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`start()`, retried with backoff while it fails transiently, for up to `timeout`
    seconds: at start-up the database or the object store may not be up yet (containers
    started together, a database restarting), and a service should wait for them rather
    than exit. Other errors (a schema not migrated, a bad URL) fail at once; when the time
    is up, TimeoutError says what stayed unreachable and why (a wrong password looks like
    an unreachable server, so it ends here too)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            return start()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff_seconds(attempt, backoff_max)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{what} still unreachable after {timeout:.0f}s "
                    f"(FEDVEC_STARTUP_TIMEOUT): {_first_line(exc)}"
                ) from exc
            attempt += 1
            log.warning(
                "%s unreachable (attempt %d), retry in %.1fs: %s",
                what,
                attempt,
                min(delay, left),
                _first_line(exc),
            )
            sleep(min(delay, left))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
