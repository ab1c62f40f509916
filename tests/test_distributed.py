"""The distributed deployment on real services: Redis broker, PostgreSQL, an S3 server;
workers and the aggregator run as separate processes (`fedvec worker`, `fedvec
aggregator`), as `honcho start` runs them.

- two workers and one aggregator, 4 clients, asynchronous updates that arrive out of
  order, plus redelivered and repeated events: every update aggregated exactly once;
- per-site queues: a site's client is trained only by that site's worker;
- a worker SIGKILLed mid-task: Redis redelivers the task, another worker completes it,
  and nothing is left half-done;
- a worker whose database URL reaches nothing trains, evaluates and is aggregated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from schema.events import UpdateStored
from schema.models import PersonalizedAdapter, ProcessedEvent, Update
from services import adapter_store as ads
from services import operations as ops
from services import processes
from services.celery_app import AGGREGATE_TASK, make_app, queue_depths, train_queue
from services.client_data import ClientSpec
from services.context import object_store
from services.db import session_scope, upgrade
from services.demo_data import build_demo_clients
from services.s3_server import start_s3_server
from services.settings import Settings
from services.signing import read_secrets
from tests.conftest import create_postgres_database, redis_broker_url, service_settings

pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    settings: Settings
    home: Path
    clients: list[ClientSpec]
    procs: list[subprocess.Popen[bytes]]

    def start(self, command: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        proc = processes.start(command, self.settings, self.home / "logs" / f"{name}.log", *args)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.home / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                for log in sorted((self.home / "logs").glob("*.log")):
                    print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.25)

    def send(self) -> Callable[..., object]:
        return make_app(self.settings).send_task


@pytest.fixture
def deployment(tmp_path, s3_endpoint) -> Iterator[Deployment]:
    url, drop = create_postgres_database()
    settings = service_settings(
        tmp_path,
        url,
        s3_endpoint,
        broker_url=redis_broker_url(),
        max_steps=2,
        batch_size=4,
        max_length=48,
        torch_threads=1,
        broker_visibility_timeout=6,
    )
    upgrade(url)
    clients = build_demo_clients(tmp_path / "data", train_per_client=16, test_per_client=8)
    dep = Deployment(settings, tmp_path, clients, [])
    try:
        yield dep
    finally:
        for p in dep.procs:
            processes.stop(p)
        drop()


def _statuses(settings: Settings) -> Counter[str]:
    with session_scope(settings.resolved_database_url) as s:
        return Counter(s.scalars(select(Update.status)))


def test_two_workers_out_of_order_updates_each_aggregated_exactly_once(deployment):
    dep = deployment
    s = dep.settings
    for c in (dep.clients[0], dep.clients[1], dep.clients[3], dep.clients[4]):
        ops.enroll(s, c.name, c.train_path, test=c.test_path, task=c.task)
    enrolled = ops.resolve_clients(s, [], all_=True)
    dep.start("aggregator", "aggregator")
    dep.start("worker", "worker-1")
    dep.start("worker", "worker-2")
    send = dep.send()
    # three waves in different orders; two workers finish them in yet another order
    orders = [enrolled, enrolled[::-1], enrolled[1:] + enrolled[:1]]
    for wave in orders:
        for c in wave:
            ops.send_train(send, ops.train_request(s, c.id), site=c.site)
    total = len(orders) * len(enrolled)
    dep.wait(f"{total} updates aggregated", lambda: _statuses(s)["aggregated"] == total)

    db = s.resolved_database_url
    with session_scope(db) as ses:
        updates = list(ses.scalars(select(Update)))
        adapters = list(ses.scalars(select(PersonalizedAdapter)))
        workers = {u.worker for u in updates}
    assert len(workers) == 2, f"both workers should have trained: {workers}"
    # exactly once: each update triggered exactly one personalized adapter
    assert sorted(a.trigger_update_id for a in adapters) == sorted(u.id for u in updates)
    for c in enrolled:
        versions = sorted(a.version for a in adapters if a.client_id == c.id)
        assert versions == [1, 2, 3], f"{c.name}: versions {versions}"

    # the same events again: redelivered (same event id) and repeated (new event id).
    # Waited for by their ids, not by a count: on a loaded machine a train request can be
    # redelivered and its report sent again, one more event that is not ours.
    repeated = []
    for u in updates:
        again = UpdateStored(update_uid=u.uid, client_id=u.client_id, round_id=None)
        repeated.append(again.event_id)
        send(AGGREGATE_TASK, args=[again.to_dict()])
        send(AGGREGATE_TASK, args=[again.to_dict()])  # the very same message twice

    def outcomes() -> Counter[str]:
        with session_scope(db) as ses:
            return Counter(
                ses.scalars(
                    select(ProcessedEvent.outcome).where(ProcessedEvent.event_id.in_(repeated))
                )
            )

    dep.wait("repeated events handled", lambda: sum(outcomes().values()) == len(updates))
    with session_scope(db) as ses:
        assert outcomes() == {"already-aggregated": len(updates)}
        assert _count(db, PersonalizedAdapter) == total  # nothing changed
    assert "duplicate, ignored" in dep.log("aggregator")
    store = object_store(s)
    for a in adapters:
        assert ads.sha256(store.get(a.key)) == a.sha256


def test_a_worker_without_database_settings_trains_and_its_update_is_aggregated(deployment):
    """A site's worker holds no server credentials: its database URL names nothing that
    exists, so any use would fail. The site enrolls its client across the boundary (it
    checks its data and keeps its private key; the admin records the request's public
    key), trains and evaluates from what the requests carry, reports through the broker,
    and the aggregator turns its update into a personalized adapter and records its
    evaluation."""
    dep = deployment
    s = dep.settings
    c = dep.clients[0]
    nowhere = s.replace(
        database_url="postgresql+psycopg://nobody:none@127.0.0.1:9/nothing",
        client_secrets_file=str(dep.home / "site-a-keys.json"),
    )
    request = ops.site_enroll(
        nowhere, c.name, c.train_path, test=c.test_path, task=c.task, site="site-a"
    )
    request_file = dep.home / "request.json"
    request_file.write_text(json.dumps(request))
    assert "private" not in request_file.read_text()
    row = ops.enroll_request(s, request_file)
    assert row["site"] == "site-a" and row["num_examples"] == request["num_examples"]
    assert not read_secrets(s.client_secrets_path)  # the admin never held the key
    (client,) = ops.resolve_clients(s, [c.name], False)
    dep.start("aggregator", "aggregator")
    log = dep.home / "logs" / "site-worker.log"
    dep.procs.append(processes.start("worker", nowhere, log, "--site", "site-a"))
    send = dep.send()
    ops.send_train(send, ops.train_request(s, client.id), site="site-a")
    dep.wait("the site's update aggregated", lambda: _statuses(s)["aggregated"] == 1)
    with session_scope(s.resolved_database_url) as ses:
        (adapter,) = ses.scalars(select(PersonalizedAdapter)).all()
        (update,) = ses.scalars(select(Update)).all()
    assert adapter.client_id == client.id and adapter.version == 1
    assert update.signature and update.worker and update.steps > 0
    (scored,) = ops.evaluate(s, [client], send, timeout=300, show=False)
    assert scored["adapter_version"] == 1 and scored["reason"] is None
    assert 0.0 <= scored["accuracy"] <= 1.0
    assert "Traceback" not in log.read_text(errors="replace")


def _count(db: str, model: type) -> int:
    with session_scope(db) as ses:
        return int(ses.scalar(select(func.count()).select_from(model)) or 0)


def test_site_clients_are_trained_only_by_their_sites_workers(deployment):
    dep = deployment
    s = dep.settings
    shared, private = dep.clients[0], dep.clients[3]
    ops.enroll(s, shared.name, shared.train_path, task=shared.task)
    ops.enroll(s, private.name, private.train_path, task=private.task, site="hospital-a")
    c_shared, c_private = ops.resolve_clients(s, [shared.name, private.name])
    dep.start("aggregator", "aggregator")
    dep.start("worker", "worker-shared")
    send = dep.send()
    ops.send_train(send, ops.train_request(s, c_private.id), site=c_private.site)
    ops.send_train(send, ops.train_request(s, c_shared.id), site=c_shared.site)
    dep.wait("the shared client aggregated", lambda: _statuses(s)["aggregated"] == 1)
    time.sleep(2)  # the shared worker is idle now; the site's task must still be waiting
    assert _statuses(s) == {"aggregated": 1, "requested": 1}
    site_queue = train_queue("hospital-a")
    assert site_queue == "train.hospital-a"
    assert queue_depths(make_app(s), [site_queue])[site_queue] == 1

    dep.start("worker", "worker-hospital-a", "--site", "hospital-a")
    dep.wait("the site's client aggregated", lambda: _statuses(s)["aggregated"] == 2)
    with session_scope(s.resolved_database_url) as ses:
        by_client = {u.client_id: u.worker for u in ses.scalars(select(Update))}
    assert by_client[c_private.id].startswith("train.hospital-a-")
    assert by_client[c_shared.id].startswith("train-")
    assert "queue 'train.hospital-a'" in dep.log("worker-hospital-a")


def test_worker_killed_mid_task_is_redelivered_and_completes_once(deployment):
    dep = deployment
    s = dep.settings.replace(epochs=40, max_steps=40)  # long enough to be killed mid-way
    dep.settings = s
    c = dep.clients[0]
    ops.enroll(s, c.name, c.train_path, task=c.task)
    (client,) = ops.resolve_clients(s, [c.name])
    dep.start("aggregator", "aggregator")
    victim = dep.start("worker", "worker-victim")
    req = ops.train_request(s, client.id)
    ops.send_train(dep.send(), req, site=client.site)
    dep.wait("training under way", lambda: "step 10/40" in dep.log("worker-victim"))
    os.killpg(victim.pid, signal.SIGKILL)  # no warm shutdown, no ack, no cleanup
    victim.wait()
    killed_at = time.monotonic()
    assert _statuses(s) == {"requested": 1}  # nothing half-written: only the request

    dep.start("worker", "worker-rescuer")
    dep.wait("the redelivered task aggregated", lambda: _statuses(s) == {"aggregated": 1})
    redelivered_after = time.monotonic() - killed_at
    assert redelivered_after >= s.broker_visibility_timeout - 1

    with session_scope(s.resolved_database_url) as ses:
        (update,) = ses.scalars(select(Update)).all()
        assert update.uid == req.request_id
        assert update.worker.startswith("train-")
        assert update.steps == 40
        adapters = list(ses.scalars(select(PersonalizedAdapter)))
    assert [(a.client_id, a.version) for a in adapters] == [(client.id, 1)]
    store = object_store(s)
    # the only objects of this client's updates are the completed update's files
    assert sorted(store.list(f"clients/{client.id}/updates/")) == sorted(
        [
            *ads.update_keys(client.id, update.uid),
            ads.sketch_key(client.id, update.uid),
            ads.report_key(client.id, update.uid),
        ]
    )
    assert "step 40/40" in dep.log("worker-rescuer")


def test_s3_outage_is_retried_with_backoff_and_the_update_completes(deployment):
    dep = deployment
    endpoint, stop = start_s3_server()  # a private S3 server this test can stop
    port = int(endpoint.rsplit(":", 1)[1])
    s = dep.settings.replace(s3_endpoint=endpoint, retry_backoff_max=2, task_max_retries=20)
    dep.settings = s
    c = dep.clients[0]
    ops.enroll(s, c.name, c.train_path, task=c.task)
    (client,) = ops.resolve_clients(s, [c.name])
    dep.start("worker", "worker")
    dep.wait("the worker ready", lambda: " ready." in dep.log("worker"))  # it checks S3 first
    stop()  # S3 goes away before the task arrives
    req = ops.train_request(s, client.id)
    ops.send_train(dep.send(), req, site=client.site)
    dep.wait(
        "a retry after the S3 failure", lambda: "transient error, retry 1/20" in dep.log("worker")
    )
    _, stop_again = start_s3_server(port)  # back, on the same address (and empty)
    report = ads.report_key(client.id, req.request_id)
    try:
        # no aggregator runs here: the update is complete once its report is stored
        dep.wait("the update stored", lambda: object_store(s).exists(report), timeout=120)
    finally:
        stop_again()
    log = dep.log("worker")
    assert "TransientStoreError" in log or "Connection refused" in log
    assert f"update={req.request_id} failed" not in log  # retried, never given up
