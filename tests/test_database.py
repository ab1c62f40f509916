"""The database layer, one suite run against both backends (SQLite file and PostgreSQL),
as Flower runs one LinkState suite against each of its backends: migrations, the lock
that serializes aggregators, constraints that make writes idempotent; and which errors
count as transient (retried) on each backend and object store."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from schema.models import Client, PersonalizedAdapter, Round, Update
from services.db import (
    SchemaNotReady,
    check_schema,
    current_revision,
    exclusive,
    head_revision,
    session_scope,
    upgrade,
)
from services.object_store import ObjectStoreError, S3Store, TransientStoreError
from services.processes import free_port
from services.transient import backoff_seconds, is_transient


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedvec.db'}"
    return request.getfixturevalue("postgres_url")


def _client(s, name: str = "a") -> Client:  # type: ignore[no-untyped-def]
    c = Client(name=name, task="t", site="default", data_path="/x", num_examples=1)
    s.add(c)
    s.flush()
    return c


def _adapter(client_id: int, update_id: int, key: str) -> PersonalizedAdapter:
    """Version 1 of a client's personalized adapter."""
    return PersonalizedAdapter(
        client_id=client_id,
        version=1,
        key=key,
        sha256="0" * 64,
        strategy="fedbip",
        sources={},
        trigger_update_id=update_id,
    )


def test_migrations_up_down_and_up_again(db_url):
    with pytest.raises(SchemaNotReady, match="fedvec db upgrade"):
        check_schema(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    check_schema(db_url)
    tables = set(inspect(create_engine(db_url)).get_table_names())
    assert {"clients", "updates", "similarity_edges", "personalized_adapters"} <= tables
    columns = {c["name"] for c in inspect(create_engine(db_url)).get_columns("evaluations")}
    assert "metric" in columns
    update_columns = {c["name"] for c in inspect(create_engine(db_url)).get_columns("updates")}
    assert "sketch" in update_columns

    from alembic import command

    from services.db import alembic_config

    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(db_url) is None
    upgrade(db_url)
    check_schema(db_url)


def test_writes_are_idempotent_by_constraint(db_url):
    upgrade(db_url)
    with session_scope(db_url) as s:
        c = _client(s)
        s.add(Update(uid="u-1", client_id=c.id, base_version=0, status="stored"))
        client_id = c.id
    # a second delivery of the same update: refused, and the transaction leaves nothing
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(Round(participants=[client_id], strategy="fedbip"))
        s.add(Update(uid="u-1", client_id=client_id, base_version=0, status="stored"))
    with session_scope(db_url) as s:
        assert s.scalar(select(Round.id)) is None
        update_id = s.scalar(select(Update.id))
        s.add(_adapter(client_id, update_id, "k"))
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(_adapter(client_id, update_id, "k2"))


def test_exclusive_admits_one_holder_at_a_time(db_url):
    upgrade(db_url)
    spans: list[tuple[float, float]] = []
    ready = threading.Barrier(3)

    def hold() -> None:
        ready.wait()
        with exclusive(db_url, "fedvec-aggregator"):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(spans) == 3
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.01, f"two holders at once: {spans}"
    # another lock name is independent
    with exclusive(db_url, "fedvec-aggregator"), exclusive(db_url, "something-else"):
        pass


def test_unreachable_services_are_transient_and_bad_requests_are_not(s3_endpoint):
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(Exception) as caught:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert is_transient(caught.value)

    with pytest.raises(TransientStoreError) as caught_s3:
        S3Store(f"127.0.0.1:{free_port()}", "bucket", "k", "s")
    assert is_transient(caught_s3.value)

    # an answer about the request itself: retrying cannot help
    store = S3Store(s3_endpoint, "fedvec-transient-check", "testing", "testing")
    with pytest.raises(ObjectStoreError) as missing:
        store.get("no/such/key")
    assert not is_transient(missing.value)
    assert not is_transient(ValueError("bad input"))
    assert not is_transient(IntegrityError("x", {}, Exception("dup")))


def test_backoff_doubles_up_to_the_cap_with_jitter():
    rng = random.Random(0)
    for retries, cap in [(0, 120), (1, 120), (3, 120), (10, 120), (10, 5)]:
        full = min(cap, 2**retries)
        for _ in range(20):
            assert full / 2 <= backoff_seconds(retries, cap, rng) <= full


def test_migrations_build_exactly_the_models(db_url):
    """The schema Alembic builds is the one the models describe: a model change without a
    migration fails here, not in production."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from schema.models import Base

    upgrade(db_url)
    with create_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
