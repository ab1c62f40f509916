"""Client keys and update signatures: enroll shows a private key once and stores only the
public key, so reading the database lets nobody sign; a worker without a client's key
cannot produce that client's updates; the aggregator refuses updates not signed with the
client's key; rotate-key replaces the pair; HMAC clients keep working until rotated."""

from __future__ import annotations

import base64
import json
import logging
import stat

import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import select, text

from aggregator.service import Aggregator
from schema.models import Client, Update
from services import operations as ops
from services.cli import cli
from services.db import get_engine, session_scope, upgrade
from services.demo_data import build_demo_clients
from services.signing import (
    ED25519_PREFIX,
    SigningError,
    add_secret,
    find_secret,
    hmac_key,
    hmac_sign,
    hmac_verify,
    new_private_key,
    pending_entry,
    public_key,
    read_secrets,
    secret_for,
    sign,
    sign_report,
    verify,
)
from workers.tasks import run_training

MSG = b'{"client_id":3,"kind":"update.reported","update_uid":"u-1"}'


def test_a_signature_binds_the_whole_message():
    key = new_private_key()
    pub = public_key(key)
    sig = sign(key, MSG)
    assert verify(pub, sig, MSG)
    assert not verify(pub, sig, MSG.replace(b"3", b"4"))  # another client
    assert not verify(pub, sig, MSG + b" ")
    assert not verify(public_key(new_private_key()), sig, MSG)
    for bad in (None, "", "zz", "00" * 64, sig[:-2]):
        assert not verify(pub, bad, MSG)
    assert key.startswith(ED25519_PREFIX) and len(pub) == 64 and len(sig) == 128
    assert sign_report(key, MSG) == sig
    with pytest.raises(SigningError, match="not an Ed25519 private key"):
        sign(ED25519_PREFIX + "not base64!", MSG)


def test_the_public_key_does_not_sign():
    """What the database holds (the public key) cannot be turned into a signature that
    verifies, unlike HMAC's key, which signs as well as it verifies."""
    key = new_private_key()
    pub = public_key(key)
    raw = bytes.fromhex(pub)
    for attempt in (ED25519_PREFIX + base64.b64encode(raw).decode(),):  # as if it were private
        assert not verify(pub, sign(attempt, MSG), MSG)
    assert not verify(pub, hmac_sign(pub, MSG), MSG)
    # HMAC, for contrast: its database value signs
    stored = hmac_key("s3cret")
    assert hmac_verify(stored, hmac_sign(stored, MSG), MSG)
    assert sign_report("s3cret", MSG) == hmac_sign(stored, MSG)


def test_secrets_file_is_private_and_errors_are_readable(tmp_path):
    path = tmp_path / "site" / "secrets.json"
    assert read_secrets(path) == {}
    add_secret(path, 1, "one")
    add_secret(path, 2, "two")
    assert read_secrets(path) == {"1": "one", "2": "two"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_for(path, 2) == "two"
    with pytest.raises(SigningError, match="holds no key for client 3"):
        secret_for(path, 3)
    path.write_text("[1, 2]")
    with pytest.raises(SigningError, match="must map client ids to keys"):
        read_secrets(path)
    path.write_text("{not json")
    with pytest.raises(SigningError, match="cannot read the client keys file"):
        read_secrets(path)


@pytest.fixture
def enrolled(embedded_settings, tmp_path):
    upgrade(embedded_settings.resolved_database_url)
    clients = build_demo_clients(tmp_path / "data", train_per_client=8, test_per_client=4)
    return embedded_settings, clients


def test_enroll_shows_the_private_key_once_and_the_database_keeps_only_the_public_key(
    enrolled,
):
    settings, clients = enrolled
    env = {"FEDVEC_HOME": settings.home}
    run = CliRunner().invoke(
        cli, ["enroll", "news-a", "--data", str(clients[0].train_path)], env=env
    )
    assert run.exit_code == 0, run.output
    key = read_secrets(settings.client_secrets_path)["1"]
    assert key.startswith(ED25519_PREFIX)
    assert f"private key (shown once): {key}" in run.output
    assert str(settings.client_secrets_path) in run.output
    as_json = CliRunner().invoke(
        cli, ["enroll", "b", "--data", str(clients[1].train_path), "--json"], env=env
    )
    row = json.loads(as_json.output)
    assert row["private_key"] == read_secrets(settings.client_secrets_path)["2"]
    assert row["signing"] == "ed25519"
    # the database holds the public key, nothing that signs; `fedvec clients` neither
    with get_engine(settings.resolved_database_url).connect() as conn:
        dump = "\n".join(str(r) for r in conn.execute(text("SELECT * FROM clients")))
    assert public_key(key) in dump
    assert key not in dump and key.removeprefix(ED25519_PREFIX) not in dump
    listed = CliRunner().invoke(cli, ["clients", "--json"], env=env).output
    assert key not in listed and json.loads(listed)[0]["signing"] == "ed25519"


def test_a_site_enrolls_its_client_without_server_credentials_and_keeps_its_key(enrolled, tmp_path):
    """site-enroll needs no database (its URL names nothing); the admin records the
    request's public key without reading the data or seeing the private key."""
    settings, clients = enrolled
    site_home = tmp_path / "site"
    site_env = {
        "FEDVEC_HOME": str(site_home),
        "FEDVEC_DATABASE_URL": "postgresql+psycopg://nobody:none@127.0.0.1:9/nothing",
    }
    request = tmp_path / "news-a.enroll.json"
    run = CliRunner().invoke(
        cli,
        ["site-enroll", "news-a", "--data", str(clients[0].train_path), "--site", "site-a"]
        + ["--out", str(request)],
        env=site_env,
    )
    assert run.exit_code == 0, run.output
    assert "fedvec enroll news-a --request" in run.output
    site_key = read_secrets(site_home / "client-secrets.json")[pending_entry("news-a")]
    body = json.loads(request.read_text())
    assert body["public_key"] == public_key(site_key) and site_key not in request.read_text()
    assert body["site"] == "site-a" and body["num_examples"] == 8

    env = {"FEDVEC_HOME": settings.home}
    wrong = CliRunner().invoke(cli, ["enroll", "other", "--request", str(request)], env=env)
    assert wrong.exit_code == 2 and "not for 'other'" in wrong.output
    both = CliRunner().invoke(
        cli, ["enroll", "news-a", "--request", str(request), "--data", "x"], env=env
    )
    assert both.exit_code == 2 and "either --data" in both.output
    done = CliRunner().invoke(
        cli, ["enroll", "news-a", "--request", str(request), "--json"], env=env
    )
    assert done.exit_code == 0, done.output
    row = json.loads(done.output)
    assert row["private_key"] is None and row["site"] == "site-a"
    assert row["data_path"] == str(clients[0].train_path.resolve())
    assert not read_secrets(settings.client_secrets_path)  # the admin holds no key
    # the site's worker finds the key by name until it is filed under the id
    assert find_secret(site_home / "client-secrets.json", row["id"], "news-a") == site_key
    again = CliRunner().invoke(cli, ["enroll", "news-a", "--request", str(request)], env=env)
    assert again.exit_code == 2 and "already enrolled" in again.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"public_key": "00" * 31}, "not an Ed25519 public key"),
        ({"num_examples": "8"}, "num_examples has the wrong type"),
        ({"site": "a/b"}, "site is not valid"),
        ({"extra": 1}, "unknown ['extra']"),
        ({"format": "x"}, "is not an enrollment request"),
    ],
)
def test_a_malformed_enrollment_request_is_refused_and_writes_nothing(
    enrolled, tmp_path, change, message
):
    settings, clients = enrolled
    site = settings.replace(home=str(tmp_path / "site"))
    body = ops.site_enroll(site, "news-a", clients[0].train_path, site="site-a")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({**body, **change}))
    env = {"FEDVEC_HOME": settings.home}
    run = CliRunner().invoke(cli, ["enroll", "news-a", "--request", str(request)], env=env)
    assert run.exit_code != 0 and message in run.output, run.output
    assert ops.list_clients(settings) == []


def test_rotate_key_replaces_the_pair_and_moves_an_hmac_client(enrolled):
    settings, clients = enrolled
    env = {"FEDVEC_HOME": settings.home}
    a = ops.enroll(settings, "a", clients[0].train_path)
    with session_scope(settings.resolved_database_url) as s:  # as enrolled before key pairs
        row = s.get(Client, a["id"])
        row.public_key, row.secret_hash = None, hmac_key("legacy")
    assert ops.list_clients(settings)[0]["signing"] == "hmac"
    run = CliRunner().invoke(cli, ["rotate-key", "a", "--json"], env=env)
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert out["signing"] == "ed25519" and out["private_key"] != a["private_key"]
    assert read_secrets(settings.client_secrets_path)[str(a["id"])] == out["private_key"]
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(Client, a["id"])
        assert row.public_key == public_key(out["private_key"]) and row.secret_hash is None
    text_run = CliRunner().invoke(cli, ["rotate-key", str(a["id"])], env=env)
    assert "private key (shown once): " in text_run.output
    unknown = CliRunner().invoke(cli, ["rotate-key", "nobody"], env=env)
    assert unknown.exit_code == 2 and "unknown client 'nobody'" in unknown.output


def test_a_worker_without_the_clients_key_writes_nothing(enrolled, tmp_path):
    """Site A's worker given client B's request (misrouted or hostile): refused before
    training, no object and no report (the task then reports the update failed)."""
    settings, clients = enrolled
    a = ops.enroll(settings, "a", clients[0].train_path, site="site-a")
    b = ops.enroll(settings, "b", clients[1].train_path, site="site-b")
    site_a = tmp_path / "site-a-keys.json"
    add_secret(site_a, a["id"], a["private_key"])
    worker_a = settings.replace(client_secrets_file=str(site_a), max_steps=1, batch_size=2)
    req = ops.train_request(settings, b["id"])
    with pytest.raises(SigningError, match=f"holds no key for client {b['id']}"):
        run_training(worker_a, req, lambda _m: None)
    with session_scope(settings.resolved_database_url) as s:  # only the server's request
        assert [u.status for u in s.scalars(select(Update))] == ["requested"]
    objects = settings.home_path / "objects" / "clients" / str(b["id"])
    assert not objects.exists()


def test_a_worker_signs_with_the_key_the_aggregator_verifies(enrolled, caplog):
    caplog.set_level(logging.DEBUG)
    settings, clients = enrolled
    a = ops.enroll(settings, "a", clients[0].train_path)
    events = []
    settings = settings.replace(max_steps=1, batch_size=2, max_length=32, torch_threads=1)
    req = ops.train_request(settings, a["id"])
    run_training(settings, req, events.append)
    (report,) = events
    assert verify(public_key(a["private_key"]), report.signature, report.signed_bytes())
    # the report is stored beside the update: a redelivered request sends it again
    # instead of training again
    again = []
    assert run_training(settings, req, again.append)["duplicate"] is True
    assert again == [report]
    assert Aggregator(settings).handle(report.to_dict()) == "aggregated"
    # the private key appears in no log line of enrollment and training, nor in any
    # metric (names, labels, values) this process exposes
    secret = a["private_key"].removeprefix(ED25519_PREFIX)
    assert caplog.text and secret not in caplog.text
    exposed = generate_latest(REGISTRY).decode()
    assert "fedvec_" in exposed and secret not in exposed


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
