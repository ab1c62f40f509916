"""Which failures are worth retrying: the database or the object store being briefly
unreachable or busy, as opposed to bad input, which fails the same way every time."""

from __future__ import annotations

import random

from sqlalchemy import exc as sa_exc

from services.object_store import TransientStoreError


def is_transient(exc: BaseException) -> bool:
    """True for lost or refused connections, timeouts and busy servers."""
    if isinstance(exc, TransientStoreError | ConnectionError | TimeoutError):
        return True
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
