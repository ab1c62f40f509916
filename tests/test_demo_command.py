"""`fedvec demo` (what `make demo` runs), shrunk: two strategies, one round, one step."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from services.cli import cli
from services.processes import settings_env
from services.settings import load_settings

pytestmark = pytest.mark.slow


def test_demo_runs_each_strategy_through_the_service(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(
        home=str(tmp_path), max_steps=1, torch_threads=1
    )
    args = [
        "demo",
        "--rounds",
        "1",
        "--train-per-client",
        "8",
        "--test-per-client",
        "4",
        "--strategies",
        "fedbip,local",
        "--json",
    ]
    result = CliRunner().invoke(cli, args, env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["strategy"] for r in data["runs"]] == ["fedbip", "local"]
    names = {c["name"] for c in data["clients"]}
    assert len(names) == 6
    for run in data["runs"]:
        assert set(run["accuracy"]) == names
        assert set(run["test_examples"].values()) == {4}
    # local never groups clients together
    local = data["runs"][1]
    assert len(set(local["groups"].values())) == 6


def test_demo_refuses_unknown_strategy(tmp_path):
    settings = load_settings(environ={}).replace(home=str(tmp_path))
    result = CliRunner().invoke(cli, ["demo", "--strategies", "magic"], env=settings_env(settings))
    assert result.exit_code == 2 and "unknown strategies ['magic']" in result.output
