"""Faults, each against real processes and services: PostgreSQL, a Redis of the test's own
(`redis-server` on a free port, nothing kept on disk), moto's S3 server; the aggregator and
the worker run as `fedvec aggregator` / `fedvec worker` child processes.

- the aggregator SIGKILLed between writing a personalized adapter object and committing
  its row, between committing and recording the event, and between recording it and
  acknowledging it: a restarted aggregator reaches the state it would have reached
  without the crash, and the only leftover of the first crash is an object `fedvec gc`
  lists;
- Redis stopped mid-run and started again on the same port: worker and aggregator
  reconnect and new work goes through; what Redis held is lost (it keeps nothing on disk)
  and aggregator start-up recovery aggregates the stored updates whose event was lost.
  An update whose event the worker could not send during the outage is aggregated by the
  aggregator's periodic recovery pass (FEDVEC_RECOVER_INTERVAL);
- PostgreSQL connections terminated while events are handled: retried, each update
  aggregated exactly once;
- the object store unreachable for good: a train task past its retries is a failed update
  that `fedvec status` shows; an aggregate task past its retries leaves its update
  `stored` until the periodic recovery pass aggregates it once S3 is back;
- a worker SIGKILLed mid-upload, its update's adapter written and its task vector not: no
  row references the half-written update, `fedvec gc` lists the adapter object once past
  the grace period (a dry run by default) and deletes it with --delete; the redelivered
  task completes once.

Crash points and gates are set by a small wrapper script (written into the test's folder)
that patches the service in the child process and then runs the normal `fedvec` entry
point: no hooks in production code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select, text

from schema.events import UpdateStored
from schema.models import PersonalizedAdapter, ProcessedEvent, Update
from services import adapter_store as ads
from services import operations as ops
from services import processes
from services.celery_app import AGGREGATE_TASK, make_app
from services.cli import cli
from services.context import object_store
from services.db import session_scope, upgrade
from services.demo_data import build_demo_clients
from services.processes import free_port, settings_env
from services.s3_server import start_s3_server
from services.settings import Settings
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    service_settings,
    unavailable,
)
from tests.test_aggregator_service import Harness, direction

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# An unacknowledged message is redelivered after this many seconds: short where a test
# waits for that, else longer than any task here (a running task is not redelivered).
VISIBILITY_S = 3
VISIBILITY_LONG_S = 60

# The child processes' entry point: patch, then run `fedvec <command>` as usual.
WRAPPER = """
import os, signal, sys, time
from pathlib import Path

mode, arg, command = sys.argv[1], sys.argv[2], sys.argv[3]


def die(where):
    print(f"FAULT: SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if mode in ("before-commit", "after-commit", "before-ack"):
    # SIGKILL at the arg-th call of the patched step
    from aggregator.publish import Publisher
    from aggregator.service import Aggregator

    calls = [0]
    # handle, or the commit: the one transaction that publishes an aggregation
    owner, name = (Aggregator, "handle") if mode == "before-ack" else (Publisher, "commit")
    original = getattr(owner, name)

    def patched(self, *args, **kwargs):
        calls[0] += 1
        if mode == "before-commit" and calls[0] == int(arg):
            die("before the commit")  # the personalized objects are written
        result = original(self, *args, **kwargs)
        if calls[0] == int(arg):
            die(mode)
        return result

    setattr(owner, name, patched)
elif mode == "publish-gate":
    # the worker's first event waits, once its update is committed, for the file <arg>/go
    import workers.tasks as tasks

    gate = Path(arg)
    publish = tasks.publish_event

    def gated(message):
        if not (gate / "go").exists():
            (gate / "publishing").write_text(message.update_uid)
            while not (gate / "go").exists():
                time.sleep(0.05)
        publish(message)

    tasks.publish_event = gated
elif mode == "mid-upload":
    # the worker (solo pool: the task runs in this process) dies with its whole process
    # group once an update's adapter object is written, before its task vector is
    from services import adapter_store

    put_state = adapter_store.put_state  # workers.tasks calls it as ads.put_state

    def dying(store, key, state, **metadata):
        digest = put_state(store, key, state, **metadata)
        if "/updates/" in key and key.endswith("/adapter.safetensors"):
            print(f"FAULT: SIGKILL after writing {key}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return digest

    adapter_store.put_state = dying
else:
    raise SystemExit(f"unknown mode {mode}")

from services.cli import main

sys.argv = ["fedvec", command]
main()
"""


class PrivateRedis:
    """A redis-server of the test's own that keeps nothing on disk, so that it can be
    stopped and started again on the same port (the shared 6379 is never touched)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        try:
            with open(self.folder / "redis.log", "ab") as log:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        except OSError as exc:
            unavailable("redis-server", exc)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    unavailable(f"redis-server on port {self.port}", exc)
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # all it holds is lost, as in a crash
            self.proc.wait()
        self.proc = None


@dataclass
class Deployment:
    settings: Settings
    home: Path
    redis: PrivateRedis
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def db(self) -> str:
        return self.settings.resolved_database_url

    def _log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def start(self, command: str, name: str) -> subprocess.Popen[bytes]:
        """`fedvec <command>`, unpatched."""
        proc = processes.start(command, self.settings, self._log_path(name))
        self.procs.append(proc)
        return proc

    def start_wrapped(
        self, command: str, name: str, mode: str, arg: str
    ) -> subprocess.Popen[bytes]:
        """`fedvec <command>` with the fault `mode` patched in (see WRAPPER)."""
        wrapper = self.home / "fault_wrapper.py"
        wrapper.write_text(WRAPPER)
        env = settings_env(self.settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        path = self._log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(wrapper), mode, arg, command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self._log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not _quietly(check):
            if time.monotonic() > deadline:
                for log in sorted((self.home / "logs").glob("*.log")):
                    print(f"----- {log.name}\n{log.read_text(errors='replace')[-5000:]}")
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)

    def wait_ready(self, name: str) -> None:
        """Until the Celery worker consumes (aggregator: after its start-up recovery)."""
        self.wait(f"{name} ready", lambda: " ready." in self.log(name))

    def send_event(self, event: UpdateStored) -> None:
        make_app(self.settings).send_task(AGGREGATE_TASK, args=[event.to_dict()])

    def stop_all(self) -> None:
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)  # all at once; then processes.stop waits each
        for p in running:
            processes.stop(p)


def _quietly(check: Callable[[], bool]) -> bool:
    """A check that reads the database while connections are being dropped may fail."""
    try:
        return check()
    except Exception:  # noqa: BLE001 - asked again at the next poll
        return False


def make_deployment(home: Path, s3_endpoint: str, **overrides: Any) -> tuple[Deployment, Callable]:
    """PostgreSQL (a fresh database), a private Redis, the S3 server: (deployment, teardown)."""
    redis_server = PrivateRedis(home / "redis")
    redis_server.start()
    try:
        url, drop = create_postgres_database()
    except BaseException:
        redis_server.stop()
        raise
    options: dict[str, Any] = dict(
        broker_url=redis_server.url,
        broker_visibility_timeout=VISIBILITY_LONG_S,
        retry_backoff_max=1,
        max_steps=1,
        batch_size=4,
        max_length=48,
        torch_threads=1,
    )
    options.update(overrides)
    settings = service_settings(home, url, s3_endpoint, **options)
    upgrade(url)
    dep = Deployment(settings, home, redis_server)

    def teardown() -> None:
        dep.stop_all()
        redis_server.stop()
        drop()

    return dep, teardown


@pytest.fixture
def deployment(tmp_path, s3_endpoint) -> Iterator[Deployment]:
    dep, teardown = make_deployment(tmp_path, s3_endpoint)
    try:
        yield dep
    finally:
        teardown()


# --- reading the state ------------------------------------------------------------------
def statuses(db: str) -> Counter[str]:
    with session_scope(db) as s:
        return Counter(s.scalars(select(Update.status)))


def status_of(db: str, uid: str) -> str | None:
    with session_scope(db) as s:
        return s.scalar(select(Update.status).where(Update.uid == uid))


def versions(db: str) -> dict[int, list[int]]:
    """Personalized adapter versions per client."""
    out: dict[int, list[int]] = {}
    with session_scope(db) as s:
        for a in s.scalars(select(PersonalizedAdapter).order_by(PersonalizedAdapter.version)):
            out.setdefault(a.client_id, []).append(a.version)
    return out


def processed(db: str) -> dict[str, str]:
    """event id -> outcome"""
    with session_scope(db) as s:
        rows = s.execute(select(ProcessedEvent.event_id, ProcessedEvent.outcome)).tuples()
        return dict(rows.all())


def assert_each_update_aggregated_once(dep: Deployment) -> None:
    """Every update reported aggregated (requests never reported, whose message was lost,
    aside), each the trigger of exactly one personalized adapter, and no row pointing to a
    missing object (adapters: with the recorded checksum)."""
    store = object_store(dep.settings)
    with session_scope(dep.db) as s:
        updates = list(s.scalars(select(Update).where(Update.status != "requested")))
        adapters = list(s.scalars(select(PersonalizedAdapter)))
    assert {u.status for u in updates} == {"aggregated"}
    assert sorted(a.trigger_update_id for a in adapters) == sorted(u.id for u in updates)
    for u in updates:
        assert store.exists(u.adapter_key) and store.exists(u.task_vector_key), u.uid
    for a in adapters:
        assert ads.sha256(store.get(a.key)) == a.sha256, a.key


def gc_orphans(settings: Settings) -> list[str]:
    """What `fedvec gc --older-than 0` (a dry run) lists."""
    result = CliRunner().invoke(
        cli, ["gc", "--older-than", "0", "--json"], env=settings_env(settings)
    )
    assert result.exit_code == 0, result.output
    return [o["key"] for o in json.loads(result.stdout)["orphans"]]


def fedvec_status(settings: Settings) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["status", "--json"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- 1. the aggregator killed mid-event ---------------------------------------------------
@pytest.mark.parametrize("point", ["before-commit", "after-commit", "before-ack"])
def test_aggregator_killed_mid_event_recovers_to_the_same_state(deployment, point):
    """The aggregator is SIGKILLed while handling the second of three events:

    - before-commit: its personalized object is written, its row is not;
    - after-commit: the adapter row and the update's status are committed, the event is not
      recorded in processed_events;
    - before-ack: all is committed, the broker message is not acknowledged.

    A normal aggregator started afterwards reaches the state of a run without the crash:
    one personalized version per client, each update aggregated exactly once, no row
    pointing to a missing object; the killed event is redelivered and changes nothing."""
    dep = deployment
    dep.settings = dep.settings.replace(broker_visibility_timeout=VISIBILITY_S)
    h = Harness(dep.settings)
    clients = [h.client(f"c{i}") for i in range(3)]
    crashing = dep.start_wrapped("aggregator", "aggregator-crash", point, "2")
    dep.wait_ready("aggregator-crash")
    events = [h.update(c, direction(10 + c), None) for c in clients]
    for e in events:
        dep.send_event(e)
    try:
        crashing.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the aggregator was not killed:\n{dep.log('aggregator-crash')[-3000:]}")
    assert crashing.returncode == -signal.SIGKILL
    first, second, third = clients
    done = processed(dep.db)

    # what the crash left behind
    if point == "before-commit":
        assert versions(dep.db) == {first: [1]}
        assert statuses(dep.db) == {"aggregated": 1, "stored": 2}
        assert set(done) == {events[0].event_id}
        # the killed aggregation's object, referenced by no row: what `fedvec gc` lists
        assert gc_orphans(dep.settings) == [ads.personalized_key(second, 1)]
    else:
        assert versions(dep.db) == {first: [1], second: [1]}
        assert statuses(dep.db) == {"aggregated": 2, "stored": 1}
        recorded = {e.event_id for e in events[: 2 if point == "before-ack" else 1]}
        assert set(done) == recorded
        assert gc_orphans(dep.settings) == []

    dep.start("aggregator", "aggregator")
    dep.wait("every update aggregated", lambda: statuses(dep.db) == {"aggregated": len(clients)})
    if point == "before-ack":
        # recorded before the crash: the redelivered message is a duplicate
        seen = f"event={events[1].event_id} update={events[1].update_uid} duplicate, ignored"
        dep.wait("the killed event redelivered", lambda: seen in dep.log("aggregator"))
    else:
        dep.wait(
            "the killed event redelivered",
            lambda: events[1].event_id in processed(dep.db),
            timeout=VISIBILITY_S + 30,
        )
    dep.wait("all events recorded", lambda: {e.event_id for e in events} <= set(processed(dep.db)))

    assert versions(dep.db) == {c: [1] for c in clients}
    assert_each_update_aggregated_once(dep)
    assert gc_orphans(dep.settings) == []  # the orphan's key was written again, now referenced
    done = processed(dep.db)
    assert done[events[0].event_id] == "aggregated"
    if point != "before-ack":
        # aggregated by start-up recovery; the event, delivered again, finds it done
        assert done[events[1].event_id] == "already-aggregated"
    log = dep.log("aggregator")
    assert f"recovering client={third} update={events[2].update_uid}" in log
    assert "Traceback" not in log


# --- 3. PostgreSQL connections dropped -----------------------------------------------------
def terminate_backends(admin, dbname: str) -> int:
    """Drops every connection to the deployment's database (the service's and this
    process's own); returns how many."""
    with admin.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": dbname},
            ).scalar()
            or 0
        )


def test_postgres_connections_dropped_while_events_are_handled(deployment):
    """pg_terminate_backend on every connection to the database, again and again, while the
    aggregator handles two waves of updates: the handling that loses its connection is
    retried with backoff, and each update is aggregated exactly once."""
    dep = deployment
    dep.settings = dep.settings.replace(task_max_retries=50, retry_backoff_max=0.5)
    h = Harness(dep.settings)
    clients = [h.client(f"c{i}") for i in range(6)]
    dep.start("aggregator", "aggregator")
    dep.wait_ready("aggregator")
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    dbname = dep.db.rsplit("/", 1)[1]
    events: list[UpdateStored] = []
    terminated = 0
    try:
        for wave in (1, 2):
            batch = [h.update(c, direction(100 * wave + c), None) for c in clients]
            events += batch
            for e in batch:
                dep.send_event(e)
            deadline = time.monotonic() + 90
            all_aggregated = {"aggregated": len(events)}
            while not _quietly(lambda want=all_aggregated: statuses(dep.db) == want):
                if time.monotonic() > deadline:
                    print(dep.log("aggregator")[-6000:])
                    pytest.fail(f"wave {wave}: updates not aggregated: {statuses(dep.db)}")
                terminated += terminate_backends(admin, dbname)
                time.sleep(0.05)
    finally:
        admin.dispose()
    dep.wait("all events recorded", lambda: {e.event_id for e in events} <= set(processed(dep.db)))
    log = dep.log("aggregator")
    print(f"{terminated} connections terminated, {log.count('transient error, retry')} retries")
    assert terminated > 0
    assert versions(dep.db) == {c: [1, 2] for c in clients}
    assert_each_update_aggregated_once(dep)
    outcomes = Counter(processed(dep.db)[e.event_id] for e in events)
    assert set(outcomes) <= {"aggregated", "already-aggregated"}, outcomes
    assert "transient error, retry" in log


# --- 2. Redis restarted -------------------------------------------------------------------
@dataclass
class RedisOutage:
    dep: Deployment
    ids: dict[str, int]  # client name -> id
    a_uid: str  # committed; its update.stored was being sent when Redis stopped
    b_uid: str  # trained after Redis came back
    a_before_restart: str | None  # A's status once B was aggregated, and a grace period later
    status_before_restart: dict[str, Any]  # `fedvec status --json`
    status_after_restart: dict[str, Any]


@pytest.fixture(scope="module")
def redis_outage(tmp_path_factory, s3_endpoint) -> Iterator[RedisOutage]:
    """One run, observed by the two tests below (it needs a real worker).

    A worker and an aggregator run. Client A is trained: its update is committed and the
    worker is about to send its `update.stored` (the wrapper holds it there) while client
    C's train request waits in the queue. Redis is killed (it keeps nothing on disk), the
    worker sends A's event into the outage, and Redis is started again on the same port a
    few seconds later. Then client B is trained. Last, the aggregator is restarted."""
    home = tmp_path_factory.mktemp("redis-outage")
    # a short recovery interval: the periodic pass is what brings A's update in
    dep, teardown = make_deployment(home, s3_endpoint, recover_interval=2)
    try:
        yield _run_redis_outage(dep)
    finally:
        teardown()


def _run_redis_outage(dep: Deployment) -> RedisOutage:
    s = dep.settings
    demo = build_demo_clients(dep.home / "data", train_per_client=8, test_per_client=2)
    for name, c in zip("ABC", (demo[0], demo[1], demo[3]), strict=True):
        ops.enroll(s, name, c.train_path, task=c.task)
    ids = {c.name: c.id for c in ops.resolve_clients(s, [], all_=True)}
    gate = dep.home / "gate"
    gate.mkdir()
    aggregator = dep.start("aggregator", "aggregator")
    dep.start_wrapped("worker", "worker", "publish-gate", str(gate))
    dep.wait_ready("aggregator")
    dep.wait_ready("worker")
    send = make_app(s).send_task
    ops.send_train(send, ops.train_request(s, ids["A"]), site="default")
    ops.send_train(send, ops.train_request(s, ids["C"]), site="default")  # queued behind A
    dep.wait("A's update committed", lambda: (gate / "publishing").exists(), timeout=120)
    a_uid = (gate / "publishing").read_text()
    dep.redis.stop()
    (gate / "go").touch()  # the worker sends A's event now, into the outage
    dep.wait("the send to fail", lambda: f"update={a_uid} failed" in dep.log("worker"))
    time.sleep(2)
    dep.redis.start()  # the same port; empty
    b = ops.train_request(s, ids["B"])
    ops.send_train(make_app(s).send_task, b, site="default")
    dep.wait("B aggregated", lambda: status_of(dep.db, b.request_id) == "aggregated", 120)
    deadline = time.monotonic() + 20  # the periodic recovery pass (every 2 s here)
    while time.monotonic() < deadline and status_of(dep.db, a_uid) != "aggregated":
        time.sleep(0.25)
    a_before_restart = status_of(dep.db, a_uid)
    status_before_restart = fedvec_status(s)
    processes.stop(aggregator)
    dep.start("aggregator", "aggregator-2")
    dep.wait("A aggregated", lambda: status_of(dep.db, a_uid) == "aggregated")
    dep.wait_ready("aggregator-2")
    return RedisOutage(
        dep=dep,
        ids=ids,
        a_uid=a_uid,
        b_uid=b.request_id,
        a_before_restart=a_before_restart,
        status_before_restart=status_before_restart,
        status_after_restart=fedvec_status(s),
    )


def _last_update(status: dict[str, Any], client: str) -> dict[str, Any] | None:
    (row,) = [c for c in status["clients"] if c["client"] == client]
    return row["last_update"]


def test_redis_restart_work_resumes_and_recovery_aggregates_the_lost_event(redis_outage):
    """Worker and aggregator reconnect by themselves: work sent after Redis is back is
    trained and aggregated without restarting anything. What Redis held when it stopped is
    gone, as it keeps nothing on disk (deployments run it with --appendonly yes): C's
    queued train request vanished (its update stays `requested`, as the server recorded
    it, and `fedvec status` shows it so), and A's event was never delivered; A's report,
    stored before its event, is found by the aggregator's start-up recovery, which
    aggregates it. Each update is aggregated once."""
    o = redis_outage
    dep = o.dep
    for name in ("worker", "aggregator"):
        log = dep.log(name)
        assert "Connection to broker lost" in log, name
        assert log.count("Connected to redis://") >= 2, name  # and connected again
    assert _last_update(o.status_before_restart, "B")["status"] == "aggregated"
    # A is never lost nor failed: requested (its report stored, its event lost) until
    # recovery, then aggregated
    assert o.a_before_restart in ("requested", "aggregated")
    assert _last_update(o.status_before_restart, "A")["status"] == o.a_before_restart
    if o.a_before_restart == "requested":
        recovered = f"recovering client={o.ids['A']} update={o.a_uid}"
        assert recovered in dep.log("aggregator-2")
    after = o.status_after_restart
    assert _last_update(after, "A")["status"] == "aggregated"
    assert _last_update(after, "B")["status"] == "aggregated"
    # C's request was lost with Redis: the server's record of it shows it never reported
    assert _last_update(after, "C")["status"] == "requested"
    assert after["updates"] == {"aggregated": 2, "requested": 1}
    assert versions(dep.db) == {o.ids["A"]: [1], o.ids["B"]: [1]}
    assert_each_update_aggregated_once(dep)


def test_event_not_sent_during_redis_outage_is_sent_when_redis_is_back(redis_outage):
    """Redis is back and the next update (B) is aggregated; A's update, committed before
    the outage, should be too, without restarting the aggregator."""
    assert redis_outage.a_before_restart == "aggregated"


# --- 4. the object store unreachable for good ---------------------------------------------
@dataclass
class S3Outage:
    dep: Deployment
    w_id: int  # trained by the worker
    w_uid: str
    h_id: int  # written as a worker does; aggregated by the aggregator
    h_uid: str
    status_down: dict[str, Any]  # `fedvec status --json` after both tasks gave up
    h_after_s3_back: str | None  # the update's status with S3 back for a while
    h_reason: str | None


@pytest.fixture(scope="module")
def s3_outage(tmp_path_factory) -> Iterator[S3Outage]:
    """One run, observed by the two tests below: S3 stops for good (FEDVEC_TASK_MAX_RETRIES
    = 1) while the worker has a train request and the aggregator an update.stored event;
    both tasks exhaust their retries. Then S3 comes back (same port, same objects), and
    a few seconds later the aggregator is restarted."""
    home = tmp_path_factory.mktemp("s3-outage")
    try:
        endpoint, stop_s3 = start_s3_server()  # a private one: this test stops it
    except RuntimeError as exc:
        unavailable("S3 test server", exc)
    stops = [stop_s3]
    try:
        dep, teardown = make_deployment(home, endpoint, task_max_retries=1, recover_interval=2)
        try:
            yield _run_s3_outage(dep, endpoint, stops)
        finally:
            teardown()
    finally:
        for stop in stops:
            stop()


def _run_s3_outage(dep: Deployment, endpoint: str, stops: list[Callable[[], None]]) -> S3Outage:
    s = dep.settings
    h = Harness(s)
    h_id = h.client("h")
    demo = build_demo_clients(dep.home / "data", train_per_client=4, test_per_client=1)
    ops.enroll(s, "w", demo[0].train_path, task=demo[0].task)
    (w,) = ops.resolve_clients(s, ["w"])
    aggregator = dep.start("aggregator", "aggregator")  # it opens the bucket at start-up
    dep.start("worker", "worker")
    dep.wait_ready("aggregator")
    dep.wait_ready("worker")
    event = h.update(h_id, direction(1), None)  # objects and row, while S3 is up
    stops.pop()()  # S3 goes away for good
    req = ops.train_request(s, w.id)
    ops.send_train(make_app(s).send_task, req, site=w.site)
    dep.send_event(event)
    dep.wait("w's update failed", lambda: status_of(dep.db, req.request_id) == "failed", 120)
    dep.wait(
        "the aggregate task to give up",
        lambda: (
            "fedvec.aggregate" in dep.log("aggregator")
            and "raised unexpected: TransientStoreError" in dep.log("aggregator")
        ),
        120,
    )
    dep.wait("w's failure event handled", lambda: "failed" in processed(dep.db).values())
    status_down = fedvec_status(s)
    _, stop_again = start_s3_server(int(endpoint.rsplit(":", 1)[1]))  # back, same objects
    stops.append(stop_again)
    # a pass that began while S3 was down may sit in urllib3's own retries for a while
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and status_of(dep.db, event.update_uid) == "stored":
        time.sleep(0.25)
    with session_scope(dep.db) as ses:
        row = ses.scalars(select(Update).where(Update.uid == event.update_uid)).one()
        h_after, h_reason = row.status, row.reason
    processes.stop(aggregator)
    dep.start("aggregator", "aggregator-2")
    dep.wait("h aggregated", lambda: status_of(dep.db, event.update_uid) == "aggregated")
    return S3Outage(
        dep=dep,
        w_id=w.id,
        w_uid=req.request_id,
        h_id=h_id,
        h_uid=event.update_uid,
        status_down=status_down,
        h_after_s3_back=h_after,
        h_reason=h_reason,
    )


def test_task_past_its_retries_is_failed_and_shown_by_status(s3_outage):
    """The train task retries once, then records a failed update with its reason, which
    `fedvec status --json` shows; the aggregator handles its update.failed. The update whose
    aggregation gave up is not lost either: a restarted aggregator aggregates it once."""
    o = s3_outage
    dep = o.dep
    assert "transient error, retry 1/1" in dep.log("worker")
    w = _last_update(o.status_down, "w")
    assert w["uid"] == o.w_uid and w["status"] == "failed"
    assert "TransientStoreError" in w["reason"] and "Connection refused" in w["reason"]
    assert o.status_down["updates"]["failed"] == 1
    assert Counter(processed(dep.db).values())["failed"] == 1  # its update.failed event
    # the aggregate side: retried once, gave up; recovered by the restarted aggregator
    assert "transient error, retry 1/1" in dep.log("aggregator")
    # recovered by the aggregator's periodic pass once S3 was back (or at its restart)
    recovered = f"recovering client={o.h_id} update={o.h_uid}"
    assert recovered in dep.log("aggregator") + dep.log("aggregator-2")
    assert statuses(dep.db) == {"failed": 1, "aggregated": 1}
    assert versions(dep.db) == {o.h_id: [1]}


def test_aggregate_task_past_its_retries_is_not_left_silently_stored(s3_outage):
    """Once the aggregate task gave up: the update is shown failed (with its reason) or is
    aggregated when S3 is back, without restarting the aggregator."""
    o = s3_outage
    assert o.h_after_s3_back == "aggregated" or (o.h_after_s3_back == "failed" and o.h_reason)


# --- 5. a worker killed mid-upload ----------------------------------------------------------
def gc_json(settings: Settings, *args: str) -> dict[str, Any]:
    """`fedvec gc --json <args>`"""
    result = CliRunner().invoke(cli, ["gc", *args, "--json"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_worker_killed_mid_upload_leaves_an_orphan_gc_collects(deployment):
    """The worker is SIGKILLed (its whole process group, so nothing acknowledges the task)
    after writing an update's adapter object and before writing its task vector. The
    update stays `requested`, with no report; the adapter object is its only leftover. `fedvec
    gc` keeps it while it is younger than the grace period (it may be an upload in flight),
    lists it with `--older-than 0` without deleting it (a dry run), and deletes it with
    `--delete`. A normal worker then gets the task redelivered and completes it once: one
    update, aggregated, both its objects stored with the row's sha256, nothing orphaned."""
    dep = deployment
    dep.settings = s = dep.settings.replace(broker_visibility_timeout=VISIBILITY_S)
    demo = build_demo_clients(dep.home / "data", train_per_client=8, test_per_client=2)
    ops.enroll(s, "A", demo[0].train_path, task=demo[0].task)
    (client,) = ops.resolve_clients(s, ["A"])
    dep.start("aggregator", "aggregator")
    victim = dep.start_wrapped("worker", "worker-victim", "mid-upload", "")
    dep.wait_ready("aggregator")
    req = ops.train_request(s, client.id)
    ops.send_train(make_app(s).send_task, req, site=client.site)
    try:
        victim.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker was not killed:\n{dep.log('worker-victim')[-3000:]}")
    assert victim.returncode == -signal.SIGKILL
    adapter_key, tv_key = ads.update_keys(client.id, req.request_id)
    assert f"FAULT: SIGKILL after writing {adapter_key}" in dep.log("worker-victim")

    # what the crash left: the server's request, the adapter object alone
    assert statuses(dep.db) == {"requested": 1}
    store = object_store(s)
    assert store.list(f"clients/{client.id}/") == [adapter_key]
    assert not store.exists(tv_key)
    young = gc_json(s)  # the default grace period (1h): possibly an upload in flight
    assert young["older_than_s"] == 3600 and young["dry_run"]
    assert (young["scanned"], young["referenced"], young["fresh"]) == (1, 0, 1)
    assert young["orphans"] == [] and young["deleted"] == 0
    dry = gc_json(s, "--older-than", "0")
    assert dry["dry_run"] and dry["deleted"] == 0
    assert [o["key"] for o in dry["orphans"]] == [adapter_key]
    assert store.exists(adapter_key)
    done = gc_json(s, "--older-than", "0", "--delete")
    assert not done["dry_run"] and [o["key"] for o in done["orphans"]] == [adapter_key]
    assert done["deleted"] == 1 and done["deleted_bytes"] == dry["orphans"][0]["size"] > 0
    assert done["kept"] == [] and done["failed"] == []
    assert store.list(f"clients/{client.id}/") == []

    # the unacknowledged task is redelivered to a normal worker and completes once
    dep.start("worker", "worker-rescuer")
    dep.wait("the redelivered task aggregated", lambda: statuses(dep.db) == {"aggregated": 1}, 120)
    with session_scope(dep.db) as ses:
        (update,) = ses.scalars(select(Update)).all()
    assert update.uid == req.request_id
    assert (update.adapter_key, update.task_vector_key) == (adapter_key, tv_key)
    assert ads.sha256(store.get(adapter_key)) == update.adapter_sha256
    assert ads.sha256(store.get(tv_key)) == update.task_vector_sha256
    assert versions(dep.db) == {client.id: [1]}
    assert_each_update_aggregated_once(dep)
    completed = [adapter_key, tv_key]
    completed += [ads.sketch_key(client.id, update.uid), ads.report_key(client.id, update.uid)]
    assert sorted(store.list(f"clients/{client.id}/updates/")) == sorted(completed)
    assert gc_orphans(s) == []
    assert "Traceback" not in dep.log("worker-rescuer")
