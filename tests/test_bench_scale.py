"""`fedvec bench scale`: the quick mode runs through the CLI and prints every figure; its
helpers (planted vectors, agreement) are right. Structure, not speed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from aggregator.sketch import normalize, sketch
from services.bench.common import percentile
from services.bench.scale import Planted, agreement
from services.cli import cli

SMALL = ["--quick", "--clients", "60,150", "--dims", "5000,20000", "--sketch-dim", "4096"]


def run(args: list[str], tmp_path) -> str:
    result = CliRunner().invoke(
        cli, ["bench", "scale", *args], env={"FEDVEC_HOME": str(tmp_path)}, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_quick_mode_prints_every_figure(tmp_path):
    out = run(SMALL, tmp_path)
    for text in (
        "count sketch k=4,096",
        "accuracy: N=300",
        "sketch |cos error| vs exact at k=4,096: p50",
        "group agreement with the same grouping on exact similarity",
        "k sweep",
        "N=150 d=20,000: per update p50",
        "sustained",
        "naive exact row",
        "naive / fedvec =",
        "memory: index",
        "process RSS growth peak",
        "per-update latency p50 / p95 ms",
        "targets",
        "p95 per update <= 250 ms",
        "sketch error p99 <= 0.02",
        "group agreement >= 99%",
        "service: Aggregator.handle per update event on postgres",
        "the whole event in the service at N=150",
    ):
        assert text in out, text
    assert out.count("per update p50") == 4 + 2  # 2 N × 2 d, and the service at 2 N


def test_quick_mode_as_ci_smoke_test_has_the_figures_of_every_cell(tmp_path):
    data = json.loads(run(["--quick", "--json"], tmp_path))  # exactly `make bench-scale-quick`
    assert {(c["clients"], c["dim"]) for c in data["cells"]} == {
        (100, 74_000),
        (1000, 74_000),
        (100, 262_144),
        (1000, 262_144),
    }
    for cell in data["cells"]:
        assert cell["latency_ms"]["p95"] >= cell["latency_ms"]["p50"] > 0
        assert cell["sustained_updates_per_s"] > 0 and cell["naive_ms"] > 0
        assert cell["memory_mb"]["index"] > 0 and cell["sketch_error"]["in_group"]["pairs"] > 0
        assert cell["generator_check"] < 1e-4  # the planted sketches are the real ones
    assert [c["clients"] for c in data["service"]] == [100, 1000]
    assert all(c["database"].startswith("postgresql") for c in data["service"])
    assert data["targets"]["service"]["with_math_p95_ms"] > 0
    acc = data["accuracy"]
    assert 0 <= acc["p50"] <= acc["p99"] <= acc["max"] < 1
    assert acc["agreement_with_exact"] >= 0.9 and acc["planted_agreement_exact"] >= 0.9
    assert [s["k"] for s in acc["k_sweep"]] == [1024, 4096, 16384, 20480]
    assert set(data["targets"]) >= {"p95_met", "updates_per_s_met", "error_p99_met"}


def test_planted_vectors_match_their_sketches_and_structure():
    p = Planted(80, 30_000, seed=1, group_size=10, k=2048)
    for i in (0, 7):
        full = p.full(i)
        assert torch.allclose(normalize(sketch(full, 2048)), normalize(p.sketch(i)), atol=1e-5)
        assert torch.equal(full, p.full(i))  # on demand, deterministic
    p.bump(7)
    assert not torch.equal(full, p.full(7))
    vectors = torch.stack([p.full(i) for i in range(80)])
    cos = normalize(vectors) @ normalize(vectors).T
    same = [(i, j) for i in range(80) for j in range(i) if p.group[i] == p.group[j]]
    other = [(i, j) for i in range(80) for j in range(i) if p.family(i) != p.family(j)]
    assert min(float(cos[i, j]) for i, j in same) > 0.3
    assert max(abs(float(cos[i, j])) for i, j in other) < 0.1


def test_agreement_counts_splits_and_merges():
    assert agreement([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert agreement([0, 0, 0, 0], [1, 1, 2, 2]) == 0.5  # merged
    assert agreement([0, 1, 2, 3], [1, 1, 1, 1]) == 0.25  # split
    with pytest.raises(ValueError):
        agreement([], [])


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95
    assert percentile(values, 100) == 100 and percentile([3.0], 99) == 3.0
