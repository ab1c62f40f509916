"""The quality benchmark's report writer on synthetic, plausible measurements."""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import pytest

from services.bench.report import QualityData, read_csv, write_report

STRATEGIES = ["local", "fedavg", "fedamp_raw", "fedbip", "fedbip_layerwise", "clustered"]
TASKS = ["definite_pronoun_resolution", "snli", "cola", "glue_qqp", "trec", "wic"]
EXTRA_TASKS = ["web_nlg_en", "fix_punct"]  # to reach 8 clients
BONUS = {
    "local": 0.0,
    "fedavg": -0.02,
    "fedamp_raw": 0.0,
    "fedbip": 0.03,
    "fedbip_layerwise": 0.035,
    "clustered": 0.02,
}


def synthetic(
    seeds: tuple[int, ...] = (0, 1, 2),
    rounds: int = 2,
    n_clients: int = 6,
    new_client: bool = True,
    groups: bool = True,
) -> QualityData:
    tasks = (TASKS + EXTRA_TASKS)[:n_clients]
    clients = [f"flan-{k}-{t}" for k, t in enumerate(tasks)]
    base = {t: 0.5 + 0.05 * k for k, t in enumerate(tasks)}
    rows = []
    for seed in seeds:
        rng = random.Random(seed)
        for s in STRATEGIES:
            for r in range(1, rounds + 1):
                for c, t in zip(clients, tasks, strict=True):
                    acc = base[t] + BONUS[s] + 0.02 * r + rng.uniform(-0.02, 0.02)
                    rows.append(_row(seed, s, r, c, t, t, "personalized", acc, 100 + 20 * len(t)))
            for c, t in zip(clients, tasks, strict=True):
                for other in tasks:
                    if other != t:
                        acc = 0.4 + BONUS[s] / 2 + rng.uniform(-0.03, 0.03)
                        rows.append(_row(seed, s, rounds, c, t, other, "generalization", acc, 200))
            for t in tasks:
                acc = base[t] - 0.05 + rng.uniform(-0.02, 0.02)
                rows.append(_row(seed, s, rounds, "global", "", t, "global", acc, 200))
            if new_client:
                acc = 0.55 + BONUS[s] + rng.uniform(-0.02, 0.02)
                rows.append(_row(seed, s, 1, "newcomer", "snli", "snli", "new_client", acc, 200))
    rng = random.Random(99)
    n = len(clients)
    tv = [[1.0 if i == j else round(rng.uniform(-0.2, 0.6), 4) for j in range(n)] for i in range(n)]
    raw = [
        [1.0 if i == j else round(rng.uniform(0.9962, 0.9991), 5) for j in range(n)]
        for i in range(n)
    ]
    grouping = {}
    if groups:
        first = {c: k % 3 for k, c in enumerate(clients)}
        # round 2 renumbers the same sets: relabelling should give them back their colours
        later = {c: (g + 1) % 3 for c, g in first.items()}
        grouping = {s: [first] + [later] * (rounds - 1) for s in ("fedbip", "fedbip_layerwise")}
        grouping["clustered"] = [{c: k % 2 for k, c in enumerate(clients)}] * rounds
    return QualityData(
        rows=rows,
        similarity={
            "clients": clients,
            "tasks": tasks,
            "task_vector": tv,
            "raw": raw,
            "strategy": "fedbip",
            "seed": seeds[0],
            "round": rounds,
        },
        groups=grouping,
        meta={
            "commit": "abc1234",
            "dataset": "flan8",
            "seeds": list(seeds),
            "rounds": rounds,
            "strategies": STRATEGIES,
            "settings": {"lora_rank": 8, "local_steps": 20},
            "train_per_client": 128,
            "test_per_client": "full",
            "started": "2025-01-01T00:00:00",
            "duration_s": 3725.0,
            "command": "fedvec bench quality --dataset flan8",
            "new_client": {"name": "newcomer", "task": "snli", "examples": 32},
            "round_eval_examples": 64,
        },
    )


def _row(seed, strategy, rnd, client, task, eval_task, kind, acc, examples) -> dict:
    return {
        "seed": seed,
        "strategy": strategy,
        "round": rnd,
        "client": client,
        "task": task,
        "eval_task": eval_task,
        "kind": kind,
        "accuracy": acc,
        # balanced accuracy below accuracy (skewed test splits); none for the global rows,
        # as for a generation task
        "balanced_accuracy": None if kind == "global" else acc - 0.05,
        "examples": examples,
    }


def _per_seed(data: QualityData, strategy: str, kind: str, rnd: int | None = None) -> list:
    seeds = sorted({r["seed"] for r in data.rows})
    return [
        [
            r
            for r in data.rows
            if r["seed"] == seed
            and r["strategy"] == strategy
            and r["kind"] == kind
            and (rnd is None or r["round"] == rnd)
        ]
        for seed in seeds
    ]


def test_full_report(tmp_path: Path) -> None:
    from matplotlib.image import imread

    data = synthetic()
    summary = write_report(tmp_path, data)

    for name in ("results.csv", "summary.json", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    for name in (
        "accuracy_per_task.png",
        "accuracy_vs_round.png",
        "similarity_heatmaps.png",
        "groups_over_rounds.png",
    ):
        image = imread(tmp_path / name)
        h, w = image.shape[:2]
        assert 400 <= w <= 4000 and 300 <= h <= 3000, (name, w, h)
        assert image.std() > 0.05  # something was drawn

    # results.csv: every row, typed, sorted
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == len(data.rows)
    key = sorted(tuple(sorted(r.items())) for r in data.rows)
    assert sorted(tuple(sorted(r.items())) for r in back) == key
    assert list(back[0]) == [
        "seed",
        "strategy",
        "round",
        "client",
        "task",
        "eval_task",
        "kind",
        "accuracy",
        "balanced_accuracy",
        "examples",
    ]
    assert [r["seed"] for r in back] == sorted(r["seed"] for r in back)

    # summary.json equals the returned dict, and its numbers equal hand-computed ones
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["table1"] == summary["table1"]
    assert "sample" in on_disk["std"]

    fedbip = [
        statistics.fmean(r["accuracy"] for r in rs)
        for rs in _per_seed(data, "fedbip", "personalized", 2)
    ]
    cell = summary["table1"]["fedbip"]["personalized"]
    assert cell["mean"] == pytest.approx(statistics.fmean(fedbip))
    assert cell["std"] == pytest.approx(statistics.stdev(fedbip))  # sample std, ddof = 1
    assert cell["n"] == 3

    weighted = [
        sum(r["accuracy"] * r["examples"] for r in rs) / sum(r["examples"] for r in rs)
        for rs in _per_seed(data, "local", "personalized", 2)
    ]
    cell = summary["table1"]["local"]["personalized_weighted"]
    assert cell["mean"] == pytest.approx(statistics.fmean(weighted))
    assert cell["std"] == pytest.approx(statistics.stdev(weighted))

    gen = [
        statistics.fmean(r["accuracy"] for r in rs)
        for rs in _per_seed(data, "fedavg", "generalization")
    ]
    assert summary["table1"]["fedavg"]["generalization"]["mean"] == pytest.approx(
        statistics.fmean(gen)
    )

    snli = [
        next(r["accuracy"] for r in rs if r["eval_task"] == "snli")
        for rs in _per_seed(data, "clustered", "personalized", 2)
    ]
    cell = summary["table2"]["snli"]["clustered"]
    assert cell["mean"] == pytest.approx(statistics.fmean(snli))
    assert cell["std"] == pytest.approx(statistics.stdev(snli))

    # round curve: round 1 mean over clients then seeds
    r1 = [
        statistics.fmean(r["accuracy"] for r in rs)
        for rs in _per_seed(data, "fedavg", "personalized", 1)
    ]
    assert summary["rounds"]["fedavg"]["mean"][0] == pytest.approx(statistics.fmean(r1))

    # bold = the maximum of its column
    report = (tmp_path / "report.md").read_text()
    for column in ("personalized", "generalization", "new_client"):
        means = {s: summary["table1"][s][column]["mean"] for s in STRATEGIES}
        best = max(means, key=means.get)
        assert summary["best"][column] == [best]
        table1 = report.split("## Table 1")[1].split("## Table 2")[0]
        c = summary["table1"][best][column]
        assert f"**{c['mean']:.3f} ± {c['std']:.3f}**" in table1
    # and a cell is bold exactly where its strategy is the column's best
    columns = [
        "personalized",
        "personalized_balanced",
        "personalized_weighted",
        "generalization",
        "global",
        "new_client",
    ]
    rows = [line.strip("| ").split(" | ") for line in table1.splitlines() if line[:2] == "| "]
    rows = [r for r in rows if r[0] in STRATEGIES]
    assert sorted(r[0] for r in rows) == sorted(STRATEGIES)
    for strategy, *cells in rows:
        for column, text in zip(columns, cells, strict=True):
            assert text.startswith("**") == (strategy in summary["best"][column]), (strategy, text)

    # the reading is generated from the numbers
    reading = " ".join(summary["reading"])
    diff = (
        summary["table1"]["fedbip"]["personalized"]["mean"]
        - summary["table1"]["fedavg"]["personalized"]["mean"]
    ) * 100
    assert f"fedbip minus fedavg, personalized accuracy: {diff:+.1f} points" in reading
    assert "fedbip_layerwise is at least as high as fedbip" in reading
    assert "Reading the numbers" in report and reading in report
    assert "- **new client**: newcomer (snli), 32 training examples" in report
    assert "- **round eval examples**: 64" in report
    for png in ("accuracy_per_task.png", "similarity_heatmaps.png", "groups_over_rounds.png"):
        assert f"]({png})" in report

    # groups: round 2 renumbers the same sets, relabelling restores round 1's numbers
    relabelled = summary["groups"]["fedbip"]["relabelled"]
    assert relabelled[0] == relabelled[1]
    sim = summary["similarity"]
    assert 0.996 < sim["raw"]["offdiag_mean"] < 0.9991


def test_single_seed_no_groups_no_new_client(tmp_path: Path) -> None:
    data = synthetic(seeds=(7,), rounds=1, n_clients=2, new_client=False, groups=False)
    summary = write_report(tmp_path, data)
    cell = summary["table1"]["fedbip"]["personalized"]
    assert cell["std"] is None and cell["n"] == 1
    assert summary["table1"]["fedbip"]["new_client"] is None
    assert summary["best"]["new_client"] == []
    report = (tmp_path / "report.md").read_text()
    assert f"| fedbip | {cell['mean']:.3f} |" in report or f"**{cell['mean']:.3f}**" in report
    assert "±" not in report.split("## Table 1")[1].split("## Reading")[0]
    assert "–" in report  # the missing new-client column
    assert not (tmp_path / "groups_over_rounds.png").exists()
    assert "groups_over_rounds.png: not drawn" in report
    assert summary["plots_skipped"]["groups_over_rounds"]
    for name in ("accuracy_per_task.png", "accuracy_vs_round.png", "similarity_heatmaps.png"):
        assert (tmp_path / name).exists()


def test_eight_clients(tmp_path: Path) -> None:
    summary = write_report(tmp_path, synthetic(seeds=(0, 1), rounds=5, n_clients=8))
    assert len(summary["tasks"]) == 8 and not summary["plots_skipped"]
    assert len(summary["rounds"]["fedbip"]["round"]) == 5


def test_no_similarity(tmp_path: Path) -> None:
    data = synthetic(seeds=(0, 1), rounds=1, n_clients=3)
    data.similarity = {}
    summary = write_report(tmp_path, data)
    assert "similarity_heatmaps" in summary["plots_skipped"]
    assert summary["tasks"] == sorted(TASKS[:3])  # from the rows when similarity names none


def test_rejects_unknown_kind(tmp_path: Path) -> None:
    data = synthetic(seeds=(0,), rounds=1, n_clients=2)
    data.rows[0]["kind"] = "other"
    with pytest.raises(ValueError, match="unknown kind"):
        write_report(tmp_path, data)


def test_without_matplotlib_writes_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a long benchmark must not lose its numbers to a missing plotting extra
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary = write_report(tmp_path, synthetic(seeds=(0,), rounds=1, n_clients=2))
    assert summary["plots"] == {}
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_reference_columns(tmp_path: Path) -> None:
    data = synthetic()
    tasks = sorted({r["task"] for r in data.rows if r["kind"] == "personalized"})
    data.meta["reference"] = {t: {"majority": 0.645, "chance": 0.5} for t in tasks[:1]}
    write_report(tmp_path, data)
    report = (tmp_path / "report.md").read_text()
    assert "| *majority* | *chance* |" in report
    assert f"| {tasks[0]} |" in report and "*0.645* | *0.500* |" in report
    assert "most frequent answer position" in report
    assert "**reference**" not in report  # a table column, not a setting line
