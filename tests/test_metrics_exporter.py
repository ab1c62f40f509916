"""`fedvec metrics`: the database-derived gauges, read at scrape time, with a real Redis
broker (whose queues do not exist while empty: their depth is 0, not unknown)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services import operations as ops
from services.metrics_exporter import DatabaseCollector
from tests.conftest import redis_broker_url


def scrape(settings) -> str:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings))
    return generate_latest(registry).decode()


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


def test_an_unreachable_database_is_reported_not_raised(embedded_settings):
    settings = embedded_settings.replace(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"
    )
    text = scrape(settings)
    assert "fedvec_database_up 0.0" in text
    assert "fedvec_clients" not in text
