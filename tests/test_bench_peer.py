"""`fedvec bench peer --quick`: the same FedAvg run in Flower's simulation (Ray) and in
fedvec's real service prints the side-by-side table, and both sides did the same run
(their final adapters agree up to float rounding)."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from services.bench import peer as bench_peer
from services.cli import cli


def test_without_flower_it_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_peer, "flower_available", lambda: False)
    result = CliRunner().invoke(
        cli,
        ["bench", "peer", "--quick", "--out", str(tmp_path)],
        env={"FEDVEC_HOME": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "pip install -e '.[bench]'" in result.output


@pytest.mark.slow
def test_quick_run_prints_the_side_by_side_table(tmp_path):
    if not bench_peer.flower_available():
        # `make test` installs the bench extra: under CI a missing Flower is a failure
        if os.environ.get("CI") == "true":
            pytest.fail(bench_peer.FLOWER_MISSING)
        pytest.skip(bench_peer.FLOWER_MISSING)
    result = CliRunner().invoke(
        cli,
        ["bench", "peer", "--quick", "--out", str(tmp_path / "peer")],
        env={"FEDVEC_HOME": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    for line in ("round 1 (s)", "round 2 (s)", "median round", "total (s)", "mean accuracy"):
        assert line in out, out
    header = next(x for x in out.splitlines() if "fedvec/Flower" in x)
    assert "Flower 1." in header and "fedvec" in header
    accuracies = [x for x in out.splitlines() if x.startswith("accuracy ")]
    assert len(accuracies) == bench_peer.QUICK.clients
    # the same run on both sides: same start, clients, seeds, steps and aggregation
    assert float(re.search(r"initial max \|fedvec - Flower\| = (\S+);", out).group(1)) == 0
    relative = float(re.search(r"/ \|fedvec - initial\| = (\S+) ", out).group(1))
    assert relative < 0.05, out
    assert re.search(r"per round fedvec is (slower|no slower)", out)


def test_profile_summary_attributes_samples_to_fedvec_functions(tmp_path):
    repo = bench_peer.REPO
    raw = tmp_path / "worker-0.txt"
    raw.write_text(
        f"main (cli.py:1);run_training ({repo}/workers/tasks.py:10);"
        f"_train ({repo}/workers/model.py:300);forward (torch/nn/modules/module.py:5) 250\n"
        f"main (cli.py:1);put_state ({repo}/services/adapter_store.py:40) 20\n"
        "main (cli.py:1);poll (kombu/transport/virtual/base.py:3) 30\n"
    )
    summary = bench_peer.summarize_profile(raw)
    assert summary["busy_s"] == 3.0
    assert summary["outside_fedvec_code_s"] == 0.3
    assert dict(summary["top"]) == {
        "workers/tasks.py:run_training": 2.5,
        "workers/model.py:_train": 2.5,
        "services/adapter_store.py:put_state": 0.2,
    }
