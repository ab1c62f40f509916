"""Shared fixtures: real backends only (a local folder, moto's S3 HTTP server)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.object_store import LocalFolderStore, S3Store
from services.s3_server import start_s3_server

# A suite started in the background inherits SIGINT ignored, and so would the CLI processes
# its tests start and send Ctrl-C to (an ignored signal stays ignored across exec; a
# handled one is default again): handled here, those processes see Ctrl-C as a user would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Host:port of a moto S3 server shared by the whole session."""
    try:
        endpoint, stop = start_s3_server()
    except RuntimeError as exc:
        # CI must exercise S3; a developer box without moto may just skip those tests.
        if os.environ.get("CI") == "true":
            pytest.fail(f"S3 test server unavailable: {exc}")
        pytest.skip(f"S3 test server unavailable: {exc}")
    yield endpoint
    stop()


@pytest.fixture
def s3_store(s3_endpoint: str) -> S3Store:
    """A fresh S3Store on its own bucket, so tests never see each other's objects."""
    return S3Store(s3_endpoint, f"test-{uuid.uuid4().hex}", S3_ACCESS_KEY, S3_SECRET_KEY)


@pytest.fixture
def local_store(tmp_path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "objects")


# --- services: settings for the two deployments -------------------------------------------
REDIS_URL = os.environ.get("FEDVEC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_ADMIN_URL = os.environ.get(
    "FEDVEC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def unavailable(what: str, exc: BaseException) -> None:
    """Under CI a missing service fails the run; elsewhere the test is skipped."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} unavailable: {exc}")
    pytest.skip(f"{what} unavailable: {exc}")


def create_postgres_database() -> tuple[str, Callable[[], None]]:
    """A fresh, empty PostgreSQL database: (url, drop)."""
    from sqlalchemy import create_engine, text

    name = f"fedvec_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem
        unavailable("PostgreSQL at " + POSTGRES_ADMIN_URL, exc)
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        from services.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test, dropped afterwards."""
    url, drop = create_postgres_database()
    yield url
    drop()


def redis_broker_url() -> str:
    """A Redis database of its own for a test run's queues (emptied first)."""
    import random

    import redis

    db = random.randint(1, 15)
    url = f"{REDIS_URL}/{db}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        client.flushdb()
        client.close()
    except Exception as exc:  # noqa: BLE001
        unavailable("Redis at " + REDIS_URL, exc)
    return url


@pytest.fixture
def embedded_settings(tmp_path):
    """Embedded default: SQLite file, local object-store folder, filesystem broker."""
    from services.db import upgrade
    from services.settings import load_settings

    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(home=str(tmp_path))
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def distributed_settings(tmp_path, postgres_url, s3_endpoint):
    """PostgreSQL + S3 server (the broker stays local: these tests do not send tasks)."""
    from services.db import upgrade

    settings = service_settings(tmp_path, postgres_url, s3_endpoint)
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture(params=["sqlite+local", "postgres+s3"])
def backend_settings(request, embedded_settings):
    """Each test that takes this runs twice: on the embedded backends and on PostgreSQL + a
    real S3 server (one suite against both, so they cannot drift apart)."""
    if request.param == "sqlite+local":
        return embedded_settings
    return request.getfixturevalue("distributed_settings")


def service_settings(home, database_url: str, s3_endpoint: str, **overrides):
    """Settings of a deployment on this PostgreSQL database and S3 server, in a fresh bucket
    (no .env, no environment: only what the test says)."""
    from services.settings import load_settings

    return load_settings(environ={}, dotenv=Path(home) / "no.env").replace(
        home=str(home),
        database_url=database_url,
        object_store_url=f"s3://fedvec-{uuid.uuid4().hex[:12]}",
        s3_endpoint=s3_endpoint,
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
        **overrides,
    )
