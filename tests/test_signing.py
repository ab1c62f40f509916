"""Client secrets and update signatures: enroll shows a secret once and stores only its
hash; a worker without a client's secret cannot produce that client's updates; the
aggregator refuses updates not signed with the client's secret."""

from __future__ import annotations

import json
import logging
import stat
import uuid

import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import select, text

from schema.events import TrainRequest
from schema.models import Update
from services import operations as ops
from services.cli import cli
from services.db import get_engine, session_scope, upgrade
from services.demo_data import build_demo_clients
from services.signing import (
    SigningError,
    add_secret,
    read_secrets,
    secret_for,
    sign,
    signing_key,
    verify,
)
from workers.tasks import run_training

SHA_A, SHA_T = "a" * 64, "b" * 64


def test_a_signature_binds_client_update_and_both_files():
    key = signing_key("s3cret")
    sig = sign(key, 3, "u-1", SHA_A, SHA_T)
    assert verify(key, sig, 3, "u-1", SHA_A, SHA_T)
    assert not verify(key, sig, 4, "u-1", SHA_A, SHA_T)  # another client
    assert not verify(key, sig, 3, "u-2", SHA_A, SHA_T)  # another update
    assert not verify(key, sig, 3, "u-1", SHA_T, SHA_A)  # other files
    assert not verify(signing_key("other"), sig, 3, "u-1", SHA_A, SHA_T)
    assert not verify(key, None, 3, "u-1", SHA_A, SHA_T)
    assert not verify(key, "", 3, "u-1", SHA_A, SHA_T)
    assert signing_key("s3cret") != "s3cret" and len(signing_key("s3cret")) == 64


def test_secrets_file_is_private_and_errors_are_readable(tmp_path):
    path = tmp_path / "site" / "secrets.json"
    assert read_secrets(path) == {}
    add_secret(path, 1, "one")
    add_secret(path, 2, "two")
    assert read_secrets(path) == {"1": "one", "2": "two"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_for(path, 2) == "two"
    with pytest.raises(SigningError, match="holds no secret for client 3"):
        secret_for(path, 3)
    path.write_text("[1, 2]")
    with pytest.raises(SigningError, match="must map client ids to secrets"):
        read_secrets(path)
    path.write_text("{not json")
    with pytest.raises(SigningError, match="cannot read the client secrets file"):
        read_secrets(path)


@pytest.fixture
def enrolled(embedded_settings, tmp_path):
    upgrade(embedded_settings.resolved_database_url)
    clients = build_demo_clients(tmp_path / "data", train_per_client=8, test_per_client=4)
    return embedded_settings, clients


def test_enroll_shows_the_secret_once_and_the_database_keeps_only_its_hash(enrolled):
    settings, clients = enrolled
    env = {"FEDVEC_HOME": settings.home}
    run = CliRunner().invoke(
        cli, ["enroll", "news-a", "--data", str(clients[0].train_path)], env=env
    )
    assert run.exit_code == 0, run.output
    secret = read_secrets(settings.client_secrets_path)["1"]
    assert f"secret (shown once): {secret}" in run.output
    assert str(settings.client_secrets_path) in run.output
    as_json = CliRunner().invoke(
        cli, ["enroll", "b", "--data", str(clients[1].train_path), "--json"], env=env
    )
    assert json.loads(as_json.output)["secret"] == read_secrets(settings.client_secrets_path)["2"]
    # not in the database, not in `fedvec clients`
    with get_engine(settings.resolved_database_url).connect() as conn:
        dump = "\n".join(str(r) for r in conn.execute(text("SELECT * FROM clients")))
    assert secret not in dump and signing_key(secret) in dump
    listed = CliRunner().invoke(cli, ["clients", "--json"], env=env).output
    assert secret not in listed and signing_key(secret) not in listed


def test_a_worker_without_the_clients_secret_writes_nothing(enrolled, tmp_path):
    """Site A's worker given client B's request (misrouted or hostile): refused before
    training, no object and no row (the task then records a failed update)."""
    settings, clients = enrolled
    a = ops.enroll(settings, "a", clients[0].train_path, site="site-a")
    b = ops.enroll(settings, "b", clients[1].train_path, site="site-b")
    site_a = tmp_path / "site-a-secrets.json"
    add_secret(site_a, a["id"], a["secret"])
    worker_a = settings.replace(client_secrets_file=str(site_a), max_steps=1, batch_size=2)
    req = TrainRequest(client_id=b["id"])
    with pytest.raises(SigningError, match=f"holds no secret for client {b['id']}"):
        run_training(worker_a, req, lambda _m: None)
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalars(select(Update)).first() is None
    objects = settings.home_path / "objects" / "clients" / str(b["id"])
    assert not objects.exists()


def test_a_worker_signs_with_the_secret_the_aggregator_verifies(enrolled, caplog):
    caplog.set_level(logging.DEBUG)
    settings, clients = enrolled
    a = ops.enroll(settings, "a", clients[0].train_path)
    events = []
    settings = settings.replace(max_steps=1, batch_size=2, max_length=32, torch_threads=1)
    run_training(
        settings, TrainRequest(client_id=a["id"], request_id=str(uuid.uuid4())), events.append
    )
    with session_scope(settings.resolved_database_url) as s:
        u = s.scalars(select(Update)).one()
        assert verify(
            signing_key(a["secret"]),
            u.signature,
            a["id"],
            u.uid,
            u.adapter_sha256,
            u.task_vector_sha256,
        )
    assert len(events) == 1
    # the secret and its key appear in no log line of enrollment and training, nor in any
    # metric (names, labels, values) this process exposes
    assert caplog.text and a["secret"] not in caplog.text
    assert signing_key(a["secret"]) not in caplog.text
    exposed = generate_latest(REGISTRY).decode()
    assert "fedvec_" in exposed
    assert a["secret"] not in exposed and signing_key(a["secret"]) not in exposed


def test_s3_enrollment_writes_a_policy_for_the_clients_own_prefix(enrolled, tmp_path):
    from services.s3_policy import client_policy, parse_s3_url

    settings, clients = enrolled
    s3 = settings.replace(object_store_url="s3://fedvec-bucket/prod")
    # the policy is written beside the row; the store itself is not touched by enroll
    row = ops.enroll(s3, "a", clients[0].train_path)
    policy = json.loads(open(row["policy_file"]).read())
    assert policy == client_policy("fedvec-bucket", "prod/", [row["id"]])
    own, shared, listing, _ = policy["Statement"]
    assert own["Resource"] == [f"arn:aws:s3:::fedvec-bucket/prod/clients/{row['id']}/*"]
    assert "s3:PutObject" in own["Action"]
    assert shared == {
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": ["arn:aws:s3:::fedvec-bucket/prod/global/*"],
    }
    assert listing["Condition"]["StringLike"]["s3:prefix"] == [
        f"prod/clients/{row['id']}/*",
        "prod/global/*",
    ]
    assert parse_s3_url("s3://b") == ("b", "")
    assert ops.enroll(settings, "local", clients[1].train_path)["policy_file"] is None
