"""Per-site broker users on the real Redis (127.0.0.1:6379): site A's user takes work from
its own queue and pushes events to the aggregator, and cannot read or push site B's queue,
read the aggregator's, nor touch anything else; a real worker trains under it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select

from schema.models import Update
from services import broker_acl, processes
from services import operations as ops
from services.celery_app import AGGREGATE_QUEUE, make_app, train_queue
from services.cli import cli
from services.db import session_scope
from services.demo_data import build_demo_clients
from services.processes import settings_env
from tests.conftest import redis_broker_url

SEP = broker_acl.SEP


@pytest.fixture
def broker() -> Iterator[tuple[str, list[str]]]:
    """An admin URL of a Redis database of its own, and site names unique to this test (ACL
    users are server-wide); the users are deleted afterwards."""
    url = redis_broker_url()
    tag = uuid.uuid4().hex[:6]
    sites = [f"a{tag}", f"b{tag}", f"a{tag}1"]  # the last: a name that extends site A's
    yield url, sites
    admin = redis.Redis.from_url(url)
    for site in sites:
        admin.execute_command("ACL", "DELUSER", broker_acl.site_user(site))
    admin.close()


def _client(creds: broker_acl.SiteCredentials) -> redis.Redis:
    return redis.Redis.from_url(creds.broker_url, socket_connect_timeout=3)


def _refused(call) -> bool:  # noqa: ANN001 - a zero-argument callable
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:  # e.g. SUBSCRIBE's refusal
        return "NOPERM" in str(exc) or "permission" in str(exc).lower()
    return False


def test_a_site_user_reaches_only_its_own_queue(broker):
    url, (a, b, a1) = broker
    creds = {s: broker_acl.site_credentials(s, url) for s in (a, b, a1)}
    for c in creds.values():
        broker_acl.apply(url, c)
    admin = redis.Redis.from_url(url)
    qa, qb, qa1 = train_queue(a), train_queue(b), train_queue(a1)
    admin.lpush(qb, "site B's task")
    admin.lpush(AGGREGATE_QUEUE, "site B's event")
    admin.hset("unacked", "tag", "someone's message in flight")
    admin.hset(f"unacked.{qb}", "tag", "site B's message in flight")
    site_a = _client(creds[a])

    # what its worker does: its queue (and kombu's priority lists), its bindings and its
    # in-flight bookkeeping; events pushed onto the aggregate queue
    site_a.lpush(qa, "task")
    assert site_a.brpop([qa, f"{qa}{SEP}3"], timeout=1) == (qa.encode(), b"task")
    site_a.sadd(f"_kombu.binding.{qa}", f"{qa}{SEP}{SEP}{qa}")
    site_a.hset(f"unacked.{qa}", "tag", "mine")
    site_a.zadd(f"unacked.{qa}.index", {"tag": 1.0})
    assert site_a.set(f"unacked.{qa}.mutex", "1", nx=True)
    site_a.lpush(AGGREGATE_QUEUE, "site A's event")
    assert admin.llen(AGGREGATE_QUEUE) == 2

    # site B's queue: neither read nor written, nor a site whose name extends A's
    for queue in (qb, f"{qb}{SEP}3", qa1):
        assert _refused(lambda q=queue: site_a.llen(q))
        assert _refused(lambda q=queue: site_a.lpush(q, "forged task"))
        assert _refused(lambda q=queue: site_a.rpop(q))
    assert admin.lrange(qb, 0, -1) == [b"site B's task"]
    # the aggregator's queue: write only
    assert _refused(lambda: site_a.rpop(AGGREGATE_QUEUE))
    assert _refused(lambda: site_a.lrange(AGGREGATE_QUEUE, 0, -1))
    assert _refused(lambda: site_a.brpop([AGGREGATE_QUEUE], timeout=1))
    assert admin.llen(AGGREGATE_QUEUE) == 2
    # nobody else's bookkeeping or bindings, no listing, no channels, no admin
    assert _refused(lambda: site_a.hgetall("unacked"))
    assert _refused(lambda: site_a.hgetall(f"unacked.{qb}"))
    assert _refused(lambda: site_a.sadd(f"_kombu.binding.{AGGREGATE_QUEUE}", "x"))
    assert _refused(lambda: site_a.sadd(f"_kombu.binding.{qb}", "x"))
    assert _refused(lambda: site_a.keys("*"))
    assert _refused(lambda: site_a.scan(0))
    assert _refused(lambda: site_a.client_list())
    assert _refused(lambda: site_a.flushdb())
    assert _refused(lambda: site_a.config_get("*"))
    assert _refused(lambda: site_a.publish("/0.celery.pidbox", "x"))
    pubsub = site_a.pubsub()

    def subscribe() -> None:
        pubsub.subscribe("/0.celery.pidbox")  # the refusal comes as the first reply
        pubsub.get_message(timeout=2)

    assert _refused(subscribe)
    # site B's user is the mirror image
    site_b = _client(creds[b])
    assert _refused(lambda: site_b.llen(qa))
    assert site_b.brpop([qb], timeout=1) == (qb.encode(), b"site B's task")
    for c in (admin, site_a, site_b):
        c.close()


def test_the_command_prints_or_applies_the_user(broker):
    url, (a, _, _) = broker
    env = {"FEDVEC_BROKER_URL": url}
    printed = CliRunner().invoke(cli, ["site-credentials", a, "--print-only", "--json"], env=env)
    assert printed.exit_code == 0, printed.output
    out = json.loads(printed.output)
    assert out["applied"] is False and out["user"] == broker_acl.site_user(a)
    admin = redis.Redis.from_url(url)
    assert admin.execute_command("ACL", "GETUSER", out["user"]) is None  # not created
    applied = CliRunner().invoke(cli, ["site-credentials", a], env=env)
    assert applied.exit_code == 0, applied.output
    line = next(x for x in applied.output.splitlines() if "FEDVEC_BROKER_URL=" in x)
    site_url = line.split("FEDVEC_BROKER_URL=")[1]
    assert redis.Redis.from_url(site_url).lpush(train_queue(a), "x") == 1
    admin.close()
    refused = CliRunner().invoke(
        cli, ["site-credentials", a], env={"FEDVEC_BROKER_URL": "filesystem://"}
    )
    assert refused.exit_code == 2 and "need a Redis broker" in refused.output


@pytest.mark.slow
def test_a_site_worker_trains_under_its_own_broker_user(broker, embedded_settings, tmp_path):
    """A real `fedvec worker --site A` connected as site A's user takes A's request, trains
    and pushes its event onto the aggregate queue; B's request stays on B's queue."""
    url, (a, b, _) = broker
    creds = broker_acl.site_credentials(a, url)
    broker_acl.apply(url, creds)
    admin_settings = embedded_settings.replace(
        broker_url=url, max_steps=1, batch_size=4, max_length=32, torch_threads=1
    )
    data = build_demo_clients(tmp_path / "data", train_per_client=8, test_per_client=4)
    ca = ops.enroll(admin_settings, "client-a", data[0].train_path, site=a)
    cb = ops.enroll(admin_settings, "client-b", data[1].train_path, site=b)
    site_settings = admin_settings.replace(
        site=a,
        broker_url=creds.broker_url,
        database_url="postgresql+psycopg://nobody:none@127.0.0.1:9/nothing",
    )
    worker = processes.start("worker", site_settings, tmp_path / "worker.log")
    try:
        send = make_app(admin_settings).send_task
        ra = ops.train_request(admin_settings, ca["id"])
        rb = ops.train_request(admin_settings, cb["id"])
        ops.send_train(send, ra, site=a)
        ops.send_train(send, rb, site=b)
        admin = redis.Redis.from_url(url)
        deadline = time.monotonic() + 240
        while admin.llen(AGGREGATE_QUEUE) < 1:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        event = json.loads(admin.lindex(AGGREGATE_QUEUE, 0))
        assert ra.request_id in json.dumps(event)
        assert "update.reported" in json.dumps(event)
        with session_scope(admin_settings.resolved_database_url) as s:
            rows = {u.uid: u.status for u in s.scalars(select(Update))}
        # the site wrote nothing to the database (it has no URL that reaches one): both
        # requests stand as the server recorded them, until the aggregator takes A's report
        assert rows == {ra.request_id: "requested", rb.request_id: "requested"}
        assert admin.llen(train_queue(b)) == 1  # B's request: untouched by A's worker
        log = (tmp_path / "worker.log").read_text()
        assert "NOPERM" not in log and "NoPermission" not in log
        admin.close()
    finally:
        processes.stop(worker)
    assert settings_env(site_settings)["FEDVEC_SITE"] == a
