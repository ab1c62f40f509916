"""The `fedvec` CLI and enrollment, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from schema.models import Client
from services import operations as ops
from services.cli import cli
from services.db import SchemaNotReady, check_schema, current_revision, head_revision, session_scope
from services.processes import settings_env

COMMANDS = [
    [],
    ["db"],
    ["db", "upgrade"],
    ["enroll"],
    ["clients"],
    ["train"],
    ["evaluate"],
    ["status"],
    ["groups"],
    ["export"],
    ["worker"],
    ["aggregator"],
    ["metrics"],
    ["demo"],
    ["rotate-key"],
    ["site-credentials"],
    ["gc"],
    ["bench"],
    ["bench", "latency"],
    ["bench", "quality"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedvec")
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 4


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [
    {"prompt": "The match ended 2-1", "options": ["sports", "tech"], "answer": "sports"},
    {"prompt": "A new chip", "options": ["sports", "tech"], "answer": "tech"},
]


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, embedded_settings):
    if request.param == "sqlite":
        return embedded_settings
    url = request.getfixturevalue("postgres_url")
    from services.db import upgrade

    s = embedded_settings.replace(database_url=url)
    upgrade(url)
    return s


def run(settings, *args):
    return CliRunner().invoke(cli, list(args), env=settings_env(settings), catch_exceptions=False)


def clients_in_db(settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return s.scalar(select(func.count()).select_from(Client))


def test_migrations_reach_head(settings):
    assert current_revision(settings.resolved_database_url) == head_revision()
    check_schema(settings.resolved_database_url)


def test_enroll_list_and_json(settings, tmp_path):
    data = write(tmp_path / "train.jsonl", GOOD)
    result = run(settings, "enroll", "alice", "--data", str(data), "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["name"] == "alice" and row["num_examples"] == 2
    listed = json.loads(run(settings, "clients", "--json").output)
    assert [c["name"] for c in listed] == ["alice"]
    dup = run(settings, "enroll", "alice", "--data", str(data))
    assert dup.exit_code == 2 and "already enrolled" in dup.output
    assert clients_in_db(settings) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "empty"),
        ('{"prompt": "x", "options": ["a", "b"], "answer": "a"}\n{not json\n', "line 2"),
        ('{"prompt": "x", "options": ["a", "b"], "answer": "c"}\n', "not one of the options"),
        ('{"prompt": "x", "options": ["a"], "answer": "a"}\n', "2 to 16 options"),
        ("[1, 2]", "must be a JSON object"),
    ],
    ids=["missing", "empty", "malformed", "bad-answer", "one-option", "not-objects"],
)
def test_bad_enrollment_is_refused_and_leaves_no_row(settings, tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    result = run(settings, "enroll", "bob", "--data", str(path))
    assert result.exit_code == 2
    assert "cannot enroll bob" in result.output and message in result.output
    assert str(path) in result.output
    assert clients_in_db(settings) == 0


def test_bad_name_and_unknown_client(settings, tmp_path):
    data = write(tmp_path / "train.jsonl", GOOD)
    result = run(settings, "enroll", "../evil", "--data", str(data))
    assert result.exit_code == 2 and "not valid" in result.output
    result = run(settings, "export", "nobody", str(tmp_path / "out"))
    assert result.exit_code == 2 and "unknown client 'nobody'" in result.output
    assert clients_in_db(settings) == 0


def test_bad_site_and_generation_data_for_an_encoder_are_refused(settings, tmp_path):
    data = write(tmp_path / "train.jsonl", GOOD)
    result = run(settings, "enroll", "alice", "--data", str(data), "--site", "a b")
    assert result.exit_code == 2 and "site 'a b' is not valid" in result.output
    gen = write(tmp_path / "gen.jsonl", [{"prompt": "fix: a,b", "answer": "a, b"}] * 2)
    result = run(settings, "enroll", "bob", "--data", str(gen))
    assert result.exit_code == 2 and "FEDVEC_MODEL_KIND=causal-lm" in result.output
    assert clients_in_db(settings) == 0
    causal = settings.replace(model_kind="causal-lm")
    result = run(causal, "enroll", "bob", "--data", str(gen), "--site", "hospital-a", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["site"] == "hospital-a"


def test_worker_options_are_documented():
    result = CliRunner().invoke(cli, ["worker", "--help"])
    assert "--site" in result.output and "--device" in result.output


def test_commands_refuse_an_unmigrated_database(tmp_path):
    from services.settings import load_settings

    settings = load_settings(environ={}).replace(home=str(tmp_path / "fresh"))
    result = run(settings, "clients")
    assert result.exit_code == 2 and "fedvec db upgrade" in result.output
    with pytest.raises(SchemaNotReady):
        check_schema(settings.resolved_database_url)


def test_status_and_groups_before_any_training(settings, tmp_path):
    ops.enroll(settings, "carol", write(tmp_path / "t.jsonl", GOOD))
    data = json.loads(run(settings, "status", "--json").output)
    assert data["clients"][0]["client"] == "carol"
    assert data["clients"][0]["personalized_version"] == 0
    assert data["queues"] == {"train": 0, "aggregate": 0}
    assert "no groups yet" in run(settings, "groups").output


def test_train_refuses_rounds_below_one(embedded_settings):
    env = settings_env(embedded_settings, {})
    for n in ("0", "-1"):
        result = CliRunner().invoke(cli, ["train", "--all", "--rounds", n], env=env)
        assert result.exit_code == 2 and "--rounds" in result.output, result.output


@pytest.mark.slow
def test_train_lists_what_failed_in_words_and_exits_1(embedded_settings, tmp_path):
    """A round in which one client's update fails (its data file went away after
    enrollment): `fedvec train` says so in a line per problem, no Python reprs, and exits 1."""
    from services import processes
    from services.demo_data import build_demo_clients

    settings = embedded_settings.replace(max_steps=1, batch_size=4, max_length=32)
    data = build_demo_clients(tmp_path / "data", train_per_client=4, test_per_client=2)
    ops.enroll(settings, "good", data[0].train_path, test=data[0].test_path)
    ops.enroll(settings, "gone", data[1].train_path)
    data[1].train_path.unlink()
    env = settings_env(settings, {})
    with processes.service(settings, tmp_path / "logs"):
        result = CliRunner().invoke(cli, ["train", "--all", "--timeout", "300"], env=env)
        evaluated = CliRunner().invoke(cli, ["evaluate", "good", "--timeout", "300"], env=env)
        # an evaluation the worker cannot do comes back as a failure with its reason (the
        # timeout would say "timed out" instead)
        data[0].test_path.unlink()
        broken = CliRunner().invoke(cli, ["evaluate", "good", "--timeout", "300"], env=env)
    assert broken.exit_code == 1, (broken.output, repr(broken.exception))
    assert "timed out" not in broken.output
    lines = re.findall(r"^client good: evaluation failed: .*$", broken.output, re.M)
    assert len(lines) == 1, (broken.output, repr(broken.exception))
    (line,) = lines
    assert "no such file" in line.lower(), line
    # balanced accuracy beside accuracy in every evaluation the CLI shows
    assert evaluated.exit_code == 0, evaluated.output
    (header,) = re.findall(r"^ *client .*$", evaluated.output.replace("\r", "\n"), re.M)
    assert header.split() == ["client", "version", "accuracy", "balanced", "accuracy", "examples"]
    assert result.exit_code == 1, result.output
    # CliRunner mixes the progress bar (stderr, redrawn with \r) into the output
    out = result.output.replace("\r", "\n")
    assert re.search(r"^ *round 1: 1 aggregated, 1 failed$", out, re.M), out
    (failed,) = re.findall(r"^  failed: client gone update .*$", out, re.M)
    assert "no such file" in failed
    assert "{" not in out  # no dict reprs
    status = CliRunner().invoke(cli, ["status"], env=env)
    assert "updates: 1 aggregated, 1 failed; last round: 1 (aggregated)" in status.output


def test_ctrl_c_on_train_says_what_happens_to_the_round(embedded_settings, tmp_path):
    """No worker runs, so the round waits: within seconds `train` says that nothing takes
    its tasks off the queue; Ctrl-C then says the requests stay sent and how to follow
    them, and exits 130 (no traceback, no bare "Aborted!")."""
    import signal
    import subprocess
    import sys
    import time

    ops.enroll(embedded_settings, "dora", write(tmp_path / "t.jsonl", GOOD))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "train", "--all"],
        # a stuck process dumps every thread's stack on SIGABRT (below)
        env={**settings_env(embedded_settings, {}), "PYTHONFAULTHANDLER": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = ""
    deadline = time.monotonic() + 90
    while "no worker has taken a task" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert "no worker has taken a task from 'train' in 2" in seen, seen  # 20 s and more
    proc.send_signal(signal.SIGINT)
    try:  # seconds on an idle machine; generous for a loaded CI runner
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # where it is stuck, from faulthandler
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"train did not exit on Ctrl-C: {out}\n{err}") from None
    assert "1 training requests sent" in seen, seen
    assert proc.returncode == 130, (out, err)
    assert "interrupted: round 1's training requests are sent and not recalled" in err
    assert "fedvec status --watch" in err and "Traceback" not in err


def test_a_round_whose_requests_could_not_be_sent_does_not_wait_for_ever(
    embedded_settings, tmp_path
):
    """The broker goes away while a round's requests are sent: those not sent are
    recorded failed with the reason (so the round completes with the ones sent); a round
    none of whose requests went out is finished by the aggregator's recovery pass."""
    from aggregator.service import Aggregator
    from schema.models import Round, Update

    s = embedded_settings
    for name in ("e1", "e2", "e3"):
        ops.enroll(s, name, write(tmp_path / f"{name}.jsonl", GOOD))
    chosen = ops.resolve_clients(s, [], all_=True)
    sent: list[str] = []

    def flaky(task: str, args: list, queue: str) -> None:
        if sent:
            raise ConnectionError("broker gone")
        sent.append(queue)

    with pytest.raises(ConnectionError):
        ops.start_round(s, chosen, flaky)
    with session_scope(s.resolved_database_url) as ses:
        rows = {u.client_id: (u.status, u.reason) for u in ses.scalars(select(Update))}
    first, *rest = (c.id for c in chosen)
    assert rows[first] == ("requested", None)
    assert all(rows[c] == ("failed", "not sent: ConnectionError: broker gone") for c in rest)

    def down(task: str, args: list, queue: str) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        ops.start_round(s, chosen, down)
    Aggregator(s).recover()
    with session_scope(s.resolved_database_url) as ses:
        statuses = [r.status for r in ses.scalars(select(Round).order_by(Round.id))]
    assert statuses == ["training", "aggregated"]  # the first still waits for e1's update
