"""Settings parsing and the typed queue messages."""

from __future__ import annotations

import dataclasses

import pytest

from schema.events import (
    EvaluationReported,
    InvalidMessage,
    TrainRequest,
    UpdateFailed,
    UpdateReported,
    UpdateStored,
    parse_event,
)
from services.settings import ENV_NAMES, load_settings, read_dotenv


def test_embedded_defaults(tmp_path):
    s = load_settings(environ={"FEDVEC_HOME": str(tmp_path)}, dotenv=tmp_path / "none")
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'fedvec.db'}"
    assert s.resolved_object_store_url == str(tmp_path / "objects")
    assert s.resolved_broker_url == "filesystem://"
    assert s.model_path and s.target_modules == ["query", "key", "value", "dense"]


def test_environment_beats_dotenv_and_types_convert(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# deployment\nFEDVEC_LORA_R=4\nexport FEDVEC_S3_SECURE=true\n"
        "FEDVEC_STRATEGY='fedavg'\nFEDVEC_GROUP_THRESHOLD=0.3\n"
    )
    s = load_settings(environ={"FEDVEC_LORA_R": "16"}, dotenv=env_file)
    assert s.lora_r == 16 and s.s3_secure is True
    assert s.strategy == "fedavg" and s.group_threshold == 0.3
    assert read_dotenv(env_file)["FEDVEC_STRATEGY"] == "fedavg"


def test_bad_value_names_the_variable(tmp_path):
    with pytest.raises(ValueError, match="FEDVEC_LORA_R"):
        load_settings(environ={"FEDVEC_LORA_R": "eight"}, dotenv=tmp_path / "none")


def test_secrets_are_masked():
    s = load_settings(environ={"FEDVEC_S3_SECRET_KEY": "hunter2"})
    assert "hunter2" not in str(s.public_dict())
    assert "FEDVEC_S3_SECRET_KEY" in ENV_NAMES


def test_events_round_trip():
    e = UpdateStored(update_uid="u1", client_id=3, round_id=None)
    assert parse_event(e.to_dict()) == e
    f = UpdateFailed(update_uid="u2", client_id=4, round_id=7, reason="no data")
    assert parse_event(f.to_dict()) == f
    r = UpdateReported(
        update_uid="u3",
        client_id=5,
        round_id=None,
        base_version=2,
        adapter_sha256="a" * 64,
        task_vector_sha256="b" * 64,
        sketch_sha256=None,
        task_vector_norm=0.25,
        num_examples=12,
        steps=3,
        train_loss=None,
        duration_s=1,
        worker="w@host",
        signature="s" * 128,
    )
    assert parse_event(r.to_dict()) == r
    # what is signed: every field but the signature and the event id (a redelivery may
    # carry a new one), in one canonical form
    signed = r.signed_bytes()
    assert dataclasses.replace(r, signature=None, event_id="x").signed_bytes() == signed
    assert dataclasses.replace(r, num_examples=13).signed_bytes() != signed
    assert b'"kind":"update.reported"' in signed
    ev = EvaluationReported(
        evaluation_uid="e1",
        client_id=5,
        adapter_version=3,
        metric="accuracy",
        accuracy=None,
        balanced_accuracy=None,
        loss=None,
        num_examples=0,
        reason="test file missing",
        signature=None,
    )
    assert parse_event(ev.to_dict()) == ev
    t = TrainRequest(
        client_id=1,
        client_name="a",
        data_path="/site/a.jsonl",
        base_version=0,
        base_key="global/initial_adapter.safetensors",
        base_sha256=None,
        signed=True,
        round_id=2,
    )
    assert TrainRequest.from_dict(t.to_dict()) == t
    # a request names everything a worker needs: none of it may be missing or mistyped
    for name in ("data_path", "base_key", "base_sha256", "signed"):
        data = t.to_dict()
        del data[name]
        with pytest.raises(InvalidMessage, match=f"missing field '{name}'"):
            TrainRequest.from_dict(data)
    with pytest.raises(InvalidMessage, match="'signed' has type int"):
        TrainRequest.from_dict({**t.to_dict(), "signed": 1})
    with pytest.raises(InvalidMessage, match="'base_version' has type bool"):
        TrainRequest.from_dict({**t.to_dict(), "base_version": True})


@pytest.mark.parametrize(
    "data, message",
    [
        ("text", "unknown event kind"),
        ({"kind": "update.exploded"}, "unknown event kind"),
        (
            {"kind": "update.stored", "client_id": 1, "round_id": None, "event_id": "e"},
            "missing field 'update_uid'",
        ),
        (
            {
                "kind": "update.stored",
                "update_uid": "u",
                "client_id": "1",
                "round_id": None,
                "event_id": "e",
            },
            "'client_id' has type str",
        ),
        (
            {
                "kind": "update.stored",
                "update_uid": "u",
                "client_id": True,
                "round_id": None,
                "event_id": "e",
            },
            "'client_id' has type bool",
        ),
        (
            {
                "kind": "update.stored",
                "update_uid": "u",
                "client_id": 1,
                "round_id": None,
                "event_id": "e",
                "extra": 1,
            },
            "unknown fields",
        ),
    ],
)
def test_malformed_events_are_refused(data, message):
    with pytest.raises(InvalidMessage, match=message):
        parse_event(data)


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = sorted(n for n in ENV_NAMES if f"`{n}`" not in readme)
    assert not missing, f"README 'Settings' lacks {missing}"
