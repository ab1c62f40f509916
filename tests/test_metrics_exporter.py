"""`fedvec metrics`: the database-derived gauges, read at scrape time, with a real Redis
broker (whose queues do not exist while empty: their depth is 0, not unknown)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from schema.models import (
    Client,
    Evaluation,
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    Round,
    SimilarityEdge,
    Update,
)
from services import operations as ops
from services.db import session_scope
from services.metrics_exporter import DatabaseCollector
from tests.conftest import redis_broker_url


def scrape(settings) -> str:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value of every sample of a scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gauges_for_clients_updates_and_every_sites_queue(embedded_settings, tmp_path):
    settings = embedded_settings.replace(broker_url=redis_broker_url())
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "options": ["a", "b"], "answer": "a"}\n')
    ops.enroll(settings, "alice", data)
    ops.enroll(settings, "bob", data, site="hospital-a")
    text = scrape(settings)
    assert "fedvec_database_up 1.0" in text
    assert "fedvec_clients 2.0" in text
    assert 'fedvec_updates{status="stored"} 0.0' in text
    for queue in ("train", "aggregate", "train.hospital-a"):
        assert f'fedvec_queue_depth{{queue="{queue}"}} 0.0' in text
    # nothing trained yet: no round, no groups, every client at version 0
    got = samples(text)
    assert got[("fedvec_last_round", ())] == 0
    assert got[("fedvec_similarity_index_size", ())] == 0
    assert got[("fedvec_client_personalized_version", (("client", "bob"),))] == 0
    assert "fedvec_group_members{" not in text and "fedvec_client_accuracy{" not in text


@pytest.fixture(params=["sqlite", "postgres"])
def state_settings(request, embedded_settings):
    settings = embedded_settings.replace(broker_url=redis_broker_url())
    if request.param == "postgres":
        from services.db import upgrade

        settings = settings.replace(database_url=request.getfixturevalue("postgres_url"))
        upgrade(settings.resolved_database_url)
    return settings


def test_per_client_group_round_and_similarity_gauges(state_settings, tmp_path):
    """alice: 2 updates (the newest 100 s old), versions 1 and 2, two evaluations; bob: one
    update 50 s old, version 1, a ROUGE-L score; carol: enrolled 500 s ago, nothing else.
    Groupings: v1 {alice, bob} in 0; v2 alice in 0, bob and carol in 1."""
    settings = state_settings
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "options": ["a", "b"], "answer": "a"}\n')
    ids = {n: ops.enroll(settings, n, data)["id"] for n in ("alice", "bob", "carol")}
    now = datetime.now(UTC)
    with session_scope(settings.resolved_database_url) as s:
        s.get(Client, ids["carol"]).enrolled_at = now - timedelta(seconds=500)
        rounds = [Round(participants=list(ids.values()), strategy="fedbip") for _ in range(3)]
        s.add_all(rounds)
        s.flush()

        def update(client: str, age_s: float, status: str) -> Update:
            row = Update(
                uid=str(uuid.uuid4()),
                client_id=ids[client],
                round_id=rounds[0].id,
                base_version=0,
                status=status,
                created_at=now - timedelta(seconds=age_s),
            )
            s.add(row)
            s.flush()
            return row

        old_a, new_a = update("alice", 1000, "aggregated"), update("alice", 100, "aggregated")
        u_b = update("bob", 50, "stored")
        for client, version, trigger in (("alice", 1, old_a), ("alice", 2, new_a), ("bob", 1, u_b)):
            s.add(
                PersonalizedAdapter(
                    client_id=ids[client],
                    version=version,
                    key=f"k/{client}/{version}",
                    sha256="0" * 64,
                    strategy="fedbip",
                    sources={},
                    trigger_update_id=trigger.id,
                )
            )
        for (ca, ua), (cb, ub) in (
            (("alice", new_a), ("bob", u_b)),
            (("bob", u_b), ("alice", new_a)),
        ):
            s.add(
                SimilarityEdge(
                    client_id=ids[ca],
                    peer_id=ids[cb],
                    cosine=0.5,
                    update_cosine=0.5,
                    update_id=ua.id,
                    peer_update_id=ub.id,
                )
            )
        for client, score, metric in (("alice", 0.5, "accuracy"), ("alice", 0.75, "accuracy")):
            s.add(
                Evaluation(
                    uid=str(uuid.uuid4()),
                    client_id=ids[client],
                    adapter_version=1,
                    metric=metric,
                    accuracy=score,
                    num_examples=4,
                )
            )
            s.flush()  # ids in insertion order: the second is the latest
        s.add(
            Evaluation(
                uid=str(uuid.uuid4()),
                client_id=ids["bob"],
                adapter_version=1,
                metric="rouge_l",
                accuracy=0.3,
                num_examples=4,
            )
        )
        for version, members in (
            (1, {"alice": 0, "bob": 0}),
            (2, {"alice": 0, "bob": 1, "carol": 1}),
        ):
            s.add(
                Grouping(
                    version=version,
                    strategy="fedbip",
                    threshold=0.1,
                    num_groups=len(set(members.values())),
                )
            )
            s.flush()
            for client, group in members.items():
                s.add(GroupMember(version=version, client_id=ids[client], group_index=group))

    got = samples(scrape(settings))

    def client(name: str, value_of: str, **labels: str) -> float:
        return got[(value_of, tuple(sorted({"client": name, **labels}.items())))]

    assert got[("fedvec_clients", ())] == 3
    assert got[("fedvec_updates", (("status", "aggregated"),))] == 2
    assert got[("fedvec_updates", (("status", "stored"),))] == 1
    assert got[("fedvec_last_round", ())] == rounds[-1].id
    assert got[("fedvec_similarity_index_size", ())] == 2
    assert got[("fedvec_groups", ())] == 2
    assert got[("fedvec_grouping_version", ())] == 2
    assert got[("fedvec_group_members", (("group", "0"),))] == 1
    assert got[("fedvec_group_members", (("group", "1"),))] == 2
    assert {n: client(n, "fedvec_client_group") for n in ids} == {"alice": 0, "bob": 1, "carol": 1}
    assert {n: client(n, "fedvec_client_personalized_version") for n in ids} == {
        "alice": 2,
        "bob": 1,
        "carol": 0,
    }
    assert client("alice", "fedvec_client_accuracy", metric="accuracy") == 0.75
    assert client("bob", "fedvec_client_accuracy", metric="rouge_l") == pytest.approx(0.3)
    assert not any(k[0] == "fedvec_client_accuracy" and ("client", "carol") in k[1] for k in got)
    # ages: the latest update, else the enrollment (a few seconds of slack for the scrape)
    for name, age in (("alice", 100), ("bob", 50), ("carol", 500)):
        assert age <= client(name, "fedvec_client_last_update_age_seconds") < age + 30


def test_an_unreachable_database_is_reported_not_raised(embedded_settings):
    settings = embedded_settings.replace(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"
    )
    text = scrape(settings)
    assert "fedvec_database_up 0.0" in text
    assert "fedvec_clients" not in text
