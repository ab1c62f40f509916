"""Database engine, sessions and migrations: SQLite (embedded) or PostgreSQL, through
SQLAlchemy; the schema is created and changed only by Alembic migrations."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent.parent / "schema" / "migrations"


class SchemaNotReady(RuntimeError):
    pass


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_connection.cursor()
    # WAL + a busy timeout: worker, aggregator and CLI processes share the file.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: survive connections the server dropped (restarts, idle timeouts)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@cache
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def as_utc(stamp: datetime) -> datetime:
    """A timestamp read back from the database, time-zone aware (SQLite keeps no zone)."""
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


# held while the aggregator regroups and publishes, and by admin commands that change a
# client's adapters or updates (remove, rollback), so that neither sees half the other
AGGREGATOR_LOCK = "fedvec-aggregator"


@contextmanager
def exclusive(url: str, name: str) -> Iterator[None]:
    """Only one process at a time runs the block, whatever the database: PostgreSQL holds a
    session advisory lock on a connection of its own for the block's duration; SQLite (one
    machine) locks a file beside the database."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        lock_path = Path(path + f".{name}.lock") if path and path != ":memory:" else None
        if lock_path is None:
            yield
            return
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            # a dropped connection releases the lock on the server by itself
            with contextlib.suppress(Exception):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    get_engine(url)  # creates the SQLite folder
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check_schema(url: str) -> None:
    """Refuse to run against a database that is not migrated to head."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise SchemaNotReady(
            f"database {redact_url(url)} is at revision {current or 'none'}, code expects "
            f"{head}: run `fedvec db upgrade`"
        )


def redact_url(url: str) -> str:
    """The URL without its password, for logs and CLI output."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
