"""A small `fedvec bench quality` run through the real service (demo data, so it runs
where flan8 is absent): the report is written, every kind of measurement is there, and
the heatmaps show what fedvec is built on: raw parameters look alike (cosine > 0.99)
while task vectors separate the two task families."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json

import pytest

from services.bench.quality import BenchPlan, run_quality_bench
from services.settings import load_settings

pytestmark = pytest.mark.slow


def test_small_run_writes_the_report_and_task_vectors_separate_tasks(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(
        home=str(tmp_path), max_length=48, learning_rate=5e-3, batch_size=4
    )
    plan = dataclasses.replace(
        BenchPlan(),
        dataset="demo",
        demo_clients=6,
        validation=4,
        strategies=("fedbip",),
        seeds=(0,),
        rounds=1,
        train_per_client=24,
        test_per_client=8,
        round_eval_examples=8,
        generalization_examples=4,
        global_examples=4,
        new_client_examples=8,
    )
    out = tmp_path / "report"
    summary = run_quality_bench(settings, plan, out, echo=print)

    for name in ("report.md", "results.csv", "summary.json", "similarity_heatmaps.png"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["strategy"], r["kind"]) for r in rows}
    for strategy in plan.strategies:
        for kind in ("personalized", "generalization", "global", "new_client"):
            assert (strategy, kind) in kinds
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["dataset"] == "demo"
    # settings chosen on validation records, and the groups scored against the tasks
    assert meta["calibration"]["group_threshold_z"] in plan.z_grid
    assert meta["calibration"]["new_client_task"] in {"news-topic", "tweet-sentiment"}
    assert len(meta["adjusted_rand_index"]["fedbip"]["0"]) == plan.rounds
    assert isinstance(meta["mixed_groups_last_round"]["fedbip"]["0"], list)
    assert all(r["balanced_accuracy"] != "" for r in rows if r["kind"] == "personalized")
    assert summary["meta"]["strategies"] == ["fedbip"]

    assert summary["meta"]["new_client"]["examples"] == 8

    # run again: every (seed, strategy) result is reused, the report is the same
    again = run_quality_bench(settings, plan, out, echo=print)
    assert again["table1"] == summary["table1"]
    sim = json.loads((out / "similarity.json").read_text())  # round 1, the first strategy
    tasks, raw, tv = sim["tasks"], sim["raw"], sim["task_vector"]
    pairs = list(itertools.combinations(range(len(tasks)), 2))
    assert min(raw[i][j] for i, j in pairs) > 0.99
    same = [tv[i][j] for i, j in pairs if tasks[i] == tasks[j]]
    different = [tv[i][j] for i, j in pairs if tasks[i] != tasks[j]]
    mean_raw = sum(raw[i][j] for i, j in pairs) / len(pairs)
    mean_tv = sum(tv[i][j] for i, j in pairs) / len(pairs)
    assert mean_tv < mean_raw - 0.5  # task vectors tell clients apart, raw weights do not
    assert max(different) < 0.5
    assert sum(same) / len(same) > sum(different) / len(different)  # families show
