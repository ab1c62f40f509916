"""`fedvec status --watch`: frames, JSON Lines, outages shown in the frame, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from services import operations as ops
from services.cli import cli
from services.processes import settings_env
from tests.conftest import POSTGRES_ADMIN_URL

GOOD = [
    {"prompt": "The match ended 2-1", "options": ["sports", "tech"], "answer": "sports"},
    {"prompt": "A new chip", "options": ["sports", "tech"], "answer": "tech"},
]
UNREACHABLE_DB = "postgresql+psycopg://fedvec:secret@127.0.0.1:1/nowhere"


def run(settings, *args):
    return CliRunner().invoke(cli, list(args), env=settings_env(settings), catch_exceptions=False)


@pytest.fixture
def enrolled(embedded_settings, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    ops.enroll(embedded_settings, "alice", data)
    ops.enroll(embedded_settings, "bob", data, site="lab")
    return embedded_settings


def frames(output: str) -> list[str]:
    return [f for f in output.split("\n\n") if f.strip()]


def test_watch_prints_count_frames_with_header_and_summary(enrolled):
    result = run(enrolled, "status", "--watch", "--count", "2", "--interval", "0.1")
    assert result.exit_code == 0, result.output
    shown = frames(result.output)
    assert len(shown) == 2, result.output
    for n, frame in enumerate(shown, 1):
        lines = frame.splitlines()
        assert lines[0].startswith("fedvec status  ") and f"frame {n}/2" in lines[0]
        assert lines[1].startswith(
            "updates: requested 0, stored 0, aggregated 0, superseded 0, rejected 0, "
            "quarantined 0, failed 0"
        )
        assert "grouping version -" in lines[1]
        assert "alice" in frame and "bob" in frame
        assert "queues: train=0, aggregate=0, train.lab=0" in frame
    assert "aggregated since last frame: -" in shown[0]  # no rate before a second frame
    assert "aggregated since last frame: 0 (0.0/s)" in shown[1]


def test_one_shot_status_keeps_its_output(enrolled):
    text = run(enrolled, "status")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    # plain words, not Python reprs (issue 20: `updates {}`, `last round None` before)
    assert lines[0].startswith("strategy ") and lines[0].endswith(
        "; updates: none; last round: none"
    )
    assert not text.output.startswith("fedvec status") and "Ctrl-C" not in text.output
    assert lines[-1] == "queues: train=0, aggregate=0, train.lab=0"
    data = json.loads(run(enrolled, "status", "--json").output)
    assert set(data) == {"strategy", "clients", "updates", "last_round", "groups", "queues"}


def test_json_watch_prints_one_object_per_line(enrolled):
    result = run(enrolled, "status", "--json", "--watch", "--count", "2", "--interval", "0.1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    objs = [json.loads(line) for line in lines]
    assert [o["frame"] for o in objs] == [1, 2]
    one_shot = json.loads(run(enrolled, "status", "--json").output)
    for o in objs:
        assert o["error"] is None and o["broker_error"] is None and o["time"]
        assert o["status"]["clients"] == one_shot["clients"]
        assert o["summary"]["updates"] == {
            "requested": 0,
            "stored": 0,
            "aggregated": 0,
            "superseded": 0,
            "rejected": 0,
            "quarantined": 0,
            "failed": 0,
            "withdrawn": 0,
        }
        assert o["summary"]["grouping_version"] is None
    assert objs[0]["summary"]["aggregated_per_s"] is None
    assert objs[1]["summary"]["aggregated_since_last_frame"] == 0


def test_summary_counts_updates_and_their_rate(enrolled, monkeypatch):
    real_status = ops.status
    calls = iter([{}, {"stored": 1, "aggregated": 3, "failed": 1}])

    def fake_status(settings, depths=None):
        data = real_status(settings, depths)
        data["updates"] = next(calls)
        return data

    monkeypatch.setattr(ops, "status", fake_status)
    result = run(enrolled, "status", "--json", "--watch", "--count", "2", "--interval", "0.1")
    summary = json.loads(result.output.splitlines()[1])["summary"]
    assert summary["updates"] == {
        "requested": 0,
        "stored": 1,
        "aggregated": 3,
        "superseded": 0,
        "rejected": 0,
        "quarantined": 0,
        "failed": 1,
        "withdrawn": 0,
    }
    assert summary["aggregated_since_last_frame"] == 3
    assert 0 < summary["aggregated_per_s"] <= 3 / 0.1 + 1e-6


def test_unreachable_database_is_shown_in_every_frame(embedded_settings):
    settings = embedded_settings.replace(database_url=UNREACHABLE_DB)
    result = run(settings, "status", "--watch", "--count", "2", "--interval", "0.1")
    assert result.exit_code == 0, result.output
    shown = frames(result.output)
    assert len(shown) == 2
    for frame in shown:
        assert "database unreachable: " in frame and "Connection refused" in frame
        assert "secret" not in frame  # the password is redacted
        assert "queues: train=" in frame
    assert "Traceback" not in result.output
    lines = run(settings, "status", "--json", "--watch", "--count", "1").output.splitlines()
    obj = json.loads(lines[0])
    assert obj["error"].startswith("database unreachable: ") and obj["status"] is None


def test_one_shot_status_fails_fast_on_an_unreachable_database(embedded_settings):
    settings = embedded_settings.replace(database_url=UNREACHABLE_DB)
    result = run(settings, "status")
    assert result.exit_code == 3  # like every command (README: exit codes)
    assert "error: database unreachable at " in result.output and "Traceback" not in result.output


def test_watch_survives_an_outage_that_starts_after_it_began(postgres_url, embedded_settings):
    """A real PostgreSQL database dropped (its connections cut) between two frames."""
    from sqlalchemy import create_engine, text

    from services.db import get_engine, upgrade

    settings = embedded_settings.replace(database_url=postgres_url)
    upgrade(postgres_url)
    name = postgres_url.rsplit("/", 1)[1]
    real_sleep = time.sleep
    dropped: list[str] = []

    def drop_after_first_frame(seconds):
        assert not dropped, "one sleep only with --count 2"
        dropped.append(name)
        get_engine(postgres_url).dispose()
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        real_sleep(seconds)

    import services.cli.observe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(services.cli.observe.time, "sleep", drop_after_first_frame)
        result = run(settings, "status", "--json", "--watch", "--count", "2", "--interval", "0.1")
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.output.splitlines())
    assert first["error"] is None and first["status"] is not None
    assert second["error"].startswith("database unreachable: ") and second["status"] is None


def test_interval_and_count_need_watch(enrolled):
    result = CliRunner().invoke(cli, ["status", "--count", "2"], env=settings_env(enrolled))
    assert result.exit_code == 2 and "--count goes with --watch" in result.output


def test_help_explains_watch():
    out = CliRunner().invoke(cli, ["status", "--help"]).output
    for word in ("--watch", "--interval", "--count", "Ctrl-C", "JSON Lines", "unreachable"):
        assert word in out, word


def test_ctrl_c_stops_watch_cleanly(enrolled, tmp_path):
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "status", "--watch", "--interval", "0.2"],
            env=settings_env(enrolled),
            stdout=stdout,
            stderr=stderr,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            deadline = time.monotonic() + 120
            while "frame 2" not in out.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, err.read_text()
                time.sleep(0.1)
            assert "frame 2" in out.read_text(), err.read_text()
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text() and "Aborted" not in err.read_text()
    assert "alice" in out.read_text()
