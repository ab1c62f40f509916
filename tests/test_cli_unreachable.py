"""A database or broker that cannot be reached: every command says so in one line (which
service, where, the setting to check; never the password) and exits 3; --debug shows the
traceback instead."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from services.cli import cli
from services.demo_data import build_demo_clients
from services.processes import free_port

PASSWORD = "s3cret-pw"


@pytest.fixture
def train_file(tmp_path):
    return str(
        build_demo_clients(tmp_path / "data", train_per_client=4, test_per_client=2)[0].train_path
    )


def _run(args, env):
    return CliRunner().invoke(cli, args, env=env)


def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and PASSWORD not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["clients"],
        ["groups"],
        ["train", "--all"],
        ["evaluate", "--all"],
        ["export", "a", "out"],
        ["gc"],
        ["db", "upgrade"],
        ["db", "current"],
        ["rotate-key", "a"],
        ["enroll", "a", "--data", "TRAIN"],
        ["enroll-flan", "FOLDER"],
        ["remove", "a", "--yes"],
        ["versions", "a"],
        ["rollback", "a", "--to", "0"],
    ],
)
def test_an_unreachable_database_is_one_line_and_exit_3(args, tmp_path, train_file):
    port = free_port()  # nothing listens there
    env = {
        "FEDVEC_HOME": str(tmp_path),
        "FEDVEC_DATABASE_URL": f"postgresql+psycopg://fedvec:{PASSWORD}@127.0.0.1:{port}/x",
    }
    folder = str(tmp_path)  # check_db comes first: the folder is never read
    result = _run([{"TRAIN": train_file, "FOLDER": folder}.get(a, a) for a in args], env)
    assert result.exit_code == 3, result.output
    line = _one_line(result)
    assert line.startswith(f"error: database unreachable at 127.0.0.1:{port}")
    assert "FEDVEC_DATABASE_URL" in line and "Connection refused" in line


def test_an_unreachable_broker_is_one_line_and_exit_3(tmp_path, train_file):
    env = {"FEDVEC_HOME": str(tmp_path)}
    assert _run(["db", "upgrade"], env).exit_code == 0
    assert _run(["enroll", "a", "--data", train_file], env).exit_code == 0
    port = free_port()
    env["FEDVEC_BROKER_URL"] = f"redis://fedvec:{PASSWORD}@127.0.0.1:{port}/0"
    result = _run(["train", "--async", "--all"], env)
    assert result.exit_code == 3, result.output
    line = _one_line(result)
    assert line.startswith(f"error: broker unreachable at 127.0.0.1:{port}")
    assert "FEDVEC_BROKER_URL" in line


def test_debug_shows_the_traceback(tmp_path):
    env = {"FEDVEC_DATABASE_URL": f"postgresql+psycopg://u:pw@127.0.0.1:{free_port()}/x"}
    result = _run(["--debug", "clients"], env)
    assert result.exit_code == 1 and result.exception is not None
    assert type(result.exception).__name__ == "OperationalError"


def test_an_unreachable_object_store_is_one_line_and_exit_3(tmp_path):
    env = {"FEDVEC_HOME": str(tmp_path)}
    assert _run(["db", "upgrade"], env).exit_code == 0
    port = free_port()
    env |= {
        "FEDVEC_OBJECT_STORE_URL": "s3://fedvec",
        "FEDVEC_S3_ENDPOINT": f"127.0.0.1:{port}",
        "FEDVEC_S3_ACCESS_KEY": "site",
        "FEDVEC_S3_SECRET_KEY": PASSWORD,
    }
    result = _run(["gc"], env)
    assert result.exit_code == 3, result.output
    line = _one_line(result)
    assert line.startswith(f"error: object store unreachable at 127.0.0.1:{port}")
    assert "FEDVEC_S3_ENDPOINT" in line
