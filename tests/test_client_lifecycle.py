"""Issue 20: removing a client and rolling one back to an earlier personalized version, on
SQLite + a local folder and on PostgreSQL + a real S3 server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from schema.events import EvaluationReported
from schema.models import PersonalizedAdapter, Round, SimilarityEdge, Update
from services import adapter_store as ads
from services import operations as ops
from services.cli import cli
from services.db import session_scope
from services.metrics_exporter import read_state
from tests.test_aggregator_service import Harness, direction, mix


@pytest.fixture
def harness(backend_settings):
    return Harness(backend_settings.replace(strategy="fedbip", group_threshold=0.2))


def _client(h: Harness, client_id: int):
    (c,) = ops.resolve_clients(h.settings, [str(client_id)], removed_ok=True)
    return c


def _ids(h: Harness, client_id: int) -> set[str]:
    with session_scope(h.db) as s:
        return set(s.scalars(select(Update.uid).where(Update.client_id == client_id)))


def _latest(h: Harness, client_id: int) -> PersonalizedAdapter:
    with session_scope(h.db) as s:
        return s.scalars(
            select(PersonalizedAdapter)
            .where(PersonalizedAdapter.client_id == client_id)
            .order_by(PersonalizedAdapter.version.desc())
        ).first()


def test_a_removed_client_leaves_every_aggregate_and_its_reports_are_refused(harness):
    h = harness
    a, b, c = (h.client(n) for n in ("a", "b", "c"))
    task = direction(1)
    first = h.round([a, b, c])
    for cid in (a, b, c):
        h.agg.handle(h.update(cid, mix(task, direction(10 + cid), 1, 0.3), first).to_dict())
    assert _latest(h, a).version == 1
    second = h.round([a, b])
    h.agg.handle(h.update(a, mix(task, direction(20), 1, 0.3), second).to_dict())
    in_flight = h.report(b, mix(task, direction(21), 1, 0.3), second)  # b still training

    out = ops.remove_client(h.settings, _client(h, b), delete_objects=True)
    assert out["requests_failed"] == 1 and out["updates_withdrawn"] == 1
    assert out["objects_deleted"] > 0
    assert h.store.list(f"clients/{b}/") == [] and h.store.list(f"clients/{a}/")
    with session_scope(h.db) as s:
        statuses = dict(s.execute(select(Update.uid, Update.status)).tuples().all())
        edges = s.scalars(
            select(SimilarityEdge).where(
                (SimilarityEdge.client_id == b) | (SimilarityEdge.peer_id == b)
            )
        ).all()
    assert {statuses[u] for u in _ids(h, b)} == {"withdrawn", "failed"}
    assert edges == []
    # its report arriving now changes nothing; the round completes without it
    assert h.agg.handle(in_flight.to_dict()) == "already-failed"
    h.agg.recover()
    with session_scope(h.db) as s:
        assert s.get(Round, second).status == "aggregated"
    assert not set(_latest(h, a).sources["updates"]) & _ids(h, b)
    assert "b" not in {m for g in ops.groups(h.settings)["groups"] for m in g["clients"]}
    assert [r["client"] for r in ops.status(h.settings)["clients"]] == ["a", "c"]
    with session_scope(h.db) as s:  # its metric series go away
        scrape = read_state(s)
    assert scrape["clients"] == 2
    assert {name for name, _ in scrape["versions"]} == {"a", "c"}
    assert "b" not in {name for name, _ in scrape["last_update"]}
    # no more training, evaluation or listing for it
    with pytest.raises(ops.OperationError, match="was removed"):
        ops.resolve_clients(h.settings, ["b"])
    assert [x.name for x in ops.resolve_clients(h.settings, [], all_=True)] == ["a", "c"]
    evaluation = EvaluationReported(
        evaluation_uid="e-1",
        client_id=b,
        adapter_version=1,
        metric="accuracy",
        accuracy=1.0,
        balanced_accuracy=1.0,
        loss=0.0,
        num_examples=1,
        reason=None,
        signature=None,
    )
    assert h.agg.handle(evaluation.to_dict()) == "unknown-client"
    # a second removal is a no-op that can finish an interrupted deletion
    again = ops.remove_client(h.settings, _client(h, b), delete_objects=True)
    assert again["already_removed"] and again["objects_deleted"] == 0


def test_rollback_publishes_an_earlier_version_again_and_refuses_a_corrupt_one(harness):
    h = harness
    a = h.client("a")
    for seed in (1, 2, 3):
        h.agg.handle(h.update(a, direction(seed), None).to_dict())
    v1 = [r for r in ops.versions(h.settings, _client(h, a)) if r["version"] == 1][0]
    assert [r["version"] for r in ops.versions(h.settings, _client(h, a))] == [1, 2, 3]

    out = ops.rollback(h.settings, _client(h, a), 1)
    assert out == {"client": "a", "version": 4, "copy_of": 1}
    with session_scope(h.db) as s:
        current = ops.current_adapter(s, a)
    assert current.version == 4 and current.sha256 == v1["sha256"]
    assert ops.train_request(h.settings, a).base_version == 4
    # the next update is aggregated on top of the copy
    assert h.agg.handle(h.update(a, direction(4), None).to_dict()) == "aggregated"
    assert _latest(h, a).version == 5

    with pytest.raises(ops.OperationError, match="0..4"):
        ops.rollback(h.settings, _client(h, a), 5)
    h.store.put(_latest(h, a).key, b"corrupt")  # version 5 is lost; 2 is corrupt too
    with session_scope(h.db) as s:
        key2 = s.scalars(
            select(PersonalizedAdapter.key).where(
                PersonalizedAdapter.client_id == a, PersonalizedAdapter.version == 2
            )
        ).one()
    h.store.put(key2, b"corrupt")
    with pytest.raises(ops.OperationError, match="cannot roll a back to version 2"):
        ops.rollback(h.settings, _client(h, a), 2)
    assert _latest(h, a).version == 5  # nothing written
    assert ops.rollback(h.settings, _client(h, a), 0)["version"] == 6
    with session_scope(h.db) as s:
        assert ops.current_adapter(s, a).key == ads.INITIAL_ADAPTER_KEY


def test_remove_versions_and_rollback_commands(embedded_settings, tmp_path):
    h = Harness(embedded_settings.replace(strategy="local"))
    a = h.client("a")
    h.client("b")
    for seed in (1, 2):
        h.agg.handle(h.update(a, direction(seed), None).to_dict())
    env = {"FEDVEC_HOME": embedded_settings.home, "FEDVEC_STRATEGY": "local"}
    runner = CliRunner()
    listed = runner.invoke(cli, ["versions", "a"], env=env)
    assert listed.exit_code == 0 and "version" in listed.output, listed.output
    back = runner.invoke(cli, ["rollback", "a", "--to", "1"], env=env)
    assert back.exit_code == 0 and "a is at version 3, a copy of version 1" in back.output
    bad = runner.invoke(cli, ["rollback", "a", "--to", "7"], env=env)
    assert bad.exit_code == 2 and "roll back to one of 0..2" in bad.output
    asked = runner.invoke(cli, ["remove", "b"], env=env, input="n\n")
    assert asked.exit_code == 1 and ops.resolve_clients(h.settings, ["b"])
    done = runner.invoke(cli, ["remove", "b", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["objects_deleted"] is None  # kept without the flag
    clients = runner.invoke(cli, ["clients"], env=env).output
    assert "b" not in clients.split()
    removed = runner.invoke(cli, ["clients", "--removed"], env=env).output
    assert "removed" in removed
    train = runner.invoke(cli, ["train", "b"], env=env)
    assert train.exit_code == 2 and "was removed" in train.output
