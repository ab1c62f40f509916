"""Clients from any FLAN-format folder: multiple choice read from the data (not from task
names or client indices), shards deterministic and disjoint, held-out records kept out of
training; and the flan8 benchmark itself where it is at hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.client_data import load_examples
from services.flan_data import build_flan_clients, shard

# where the settings look by default: shared/ beside the repository
FLAN8 = Path(__file__).resolve().parents[2] / "shared" / "data" / "flan8"
needs_flan8 = pytest.mark.skipif(not (FLAN8 / "test.jsonl").is_file(), reason=f"no {FLAN8}")


def _choice(task: str, i: int, options: list[str]) -> dict:
    answer = options[i % len(options)]
    listed = "\n".join(f"- {o}" for o in options)
    return {
        "instruction": f"{task} question {i}?\n\nOPTIONS:\n{listed}",
        "output": answer,
        "task": task,
        "category": "made-up",
    }


def _generation(task: str, i: int) -> dict:
    return {"instruction": f"Rewrite {i}", "output": f"text {i}", "task": task}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Three clients, indices not 0..2 and names unlike flan8's: a 3-option task, a text
    task and a 2-option task."""
    root = tmp_path / "flan"
    root.mkdir()
    files = {
        3: [_choice("colours", i, ["red", "green", "blue"]) for i in range(40)],
        7: [_generation("rewrite", i) for i in range(20)],
        12: [_choice("yesno", i, ["yes", "no"]) for i in range(30)],
    }
    for k, records in files.items():
        (root / f"train_client_{k}.json").write_text(json.dumps(records))
    test = [_choice("colours", 100 + i, ["red", "green", "blue"]) for i in range(9)]
    test += [_choice("yesno", 100 + i, ["yes", "no"]) for i in range(7)]
    test += [_generation("rewrite", 100 + i) for i in range(5)]
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test) + "\n")
    return root


def test_multiple_choice_clients_are_read_from_the_data(mixed_folder, tmp_path):
    built = build_flan_clients(mixed_folder, tmp_path / "out")
    assert [(c.name, c.task) for c in built.clients] == [
        ("flan-3-colours", "colours"),
        ("flan-12-yesno", "yesno"),
    ]
    assert len(built.left_out) == 1 and "client 7 (rewrite)" in built.left_out[0]
    assert len(load_examples(built.clients[0].test_path)) == 9
    assert len(load_examples(built.clients[1].test_path)) == 7
    with_text = build_flan_clients(mixed_folder, tmp_path / "gen", generation=True)
    assert [c.task for c in with_text.clients] == ["colours", "rewrite", "yesno"]


def test_shards_are_disjoint_deterministic_and_keep_held_out_records_apart(mixed_folder, tmp_path):
    built = build_flan_clients(
        mixed_folder, tmp_path / "a", shards=4, validation=6, reserve=4, train_per_client=None
    )
    colours = [c for c in built.clients if c.task == "colours"]
    assert [c.name for c in colours] == [f"flan-3.{j}-colours" for j in range(4)]
    parts = [load_examples(c.train_path) for c in colours]
    assert sorted(len(p) for p in parts) == [7, 7, 8, 8]  # 40 - 6 - 4 = 30 records
    prompts = [ex.prompt for p in parts for ex in p]
    assert len(prompts) == len(set(prompts)) == 30
    held = {ex.prompt for ex in built.validation["colours"] + built.reserve["colours"]}
    assert len(held) == 10 and not held & set(prompts)
    assert {ex.prompt for ex in load_examples(colours[0].validation_path)} == {
        ex.prompt for ex in built.validation["colours"]
    }
    again = build_flan_clients(
        mixed_folder, tmp_path / "b", shards=4, validation=6, reserve=4, train_per_client=None
    )
    assert [load_examples(c.train_path) for c in again.clients] == [
        load_examples(c.train_path) for c in built.clients
    ]


def test_shard_sizes_and_refusals():
    assert [len(p) for p in shard(list(range(10)), 3)] == [4, 3, 3]
    assert sum(shard(list(range(10)), 3), []) == list(range(10))
    with pytest.raises(ValueError, match="cannot make 4 shards"):
        shard([1, 2, 3], 4)
    with pytest.raises(ValueError, match="at least 1"):
        shard([1], 0)


def test_too_few_records_for_what_is_held_out(mixed_folder, tmp_path):
    with pytest.raises(ValueError, match="too few"):
        build_flan_clients(mixed_folder, tmp_path / "out", validation=30, reserve=5)


def test_missing_and_incomplete_folders(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as info:
        build_flan_clients(missing, tmp_path / "out")
    assert str(missing) in str(info.value) and "train_client_K.json" in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="train_client_0.json is missing"):
        build_flan_clients(tmp_path / "empty", tmp_path / "out")


@needs_flan8
def test_flan8_six_multiple_choice_clients_read_in_place(tmp_path):
    built = build_flan_clients(FLAN8, tmp_path)
    assert [c.name for c in built.clients] == [
        "flan-0-definite_pronoun_resolution",
        "flan-1-snli",
        "flan-2-cola",
        "flan-3-glue_qqp",
        "flan-4-trec",
        "flan-7-wic",
    ]
    assert len(built.left_out) == 2
    n_options = {"snli": 3, "trec": 6}
    for c in built.clients:
        train, test = load_examples(c.train_path), load_examples(c.test_path)
        assert (len(train), len(test)) == (300, 200)
        assert all(len(ex.options) == n_options.get(c.task, 2) for ex in train + test)
        assert all("OPTIONS" not in ex.prompt for ex in train + test)
        # the train files are sorted by answer: the shuffled order mixes them
        labels = [ex.label for ex in train[:32]]
        assert max(labels.count(v) for v in set(labels)) <= 0.75 * len(labels), c.name
    assert not any(p.suffix == ".tmp" for p in FLAN8.iterdir())  # read, never written


def test_the_threshold_is_chosen_in_the_middle_of_the_best_plateau():
    from services.bench.quality import NO_GROUPING_Z, choose_z

    # flan8's calibration: every value from 1.5 up, and "alone", group nothing: ARI 1
    score = {1.0: 0.0, 1.5: 1.0, 2.0: 1.0, 2.5: 1.0, 3.0: 1.0, 4.0: 1.0, NO_GROUPING_Z: 1.0}
    assert choose_z(score) == 2.5
    assert choose_z({1.0: 0.2, 2.0: 0.9, 3.0: 0.4, NO_GROUPING_Z: 0.0}) == 2.0
    assert choose_z({1.0: 0.1, NO_GROUPING_Z: 1.0}) == NO_GROUPING_Z


def test_mixed_groups_are_the_groups_that_hold_more_than_one_task():
    from services.bench.quality import mixed_groups

    task_of = {"a1": "trec", "a2": "trec", "b1": "wic", "b2": "wic", "c1": "cola"}
    # trec alone in two groups is not mixed; wic + cola is, and so is trec + wic
    groups = {"a1": 0, "a2": 1, "b1": 2, "c1": 2, "b2": 1}
    assert mixed_groups(groups, task_of) == [["cola", "wic"], ["trec", "wic"]]
    assert mixed_groups({"a1": 0, "a2": 0, "b1": 1, "b2": 2, "c1": 3}, task_of) == []
    assert mixed_groups({"a1": 0, "late": 0}, task_of) == []  # unknown names are left out


def test_stored_results_depend_on_the_settings_that_can_change_them():
    import dataclasses

    from services.bench.quality import RESULT_NEUTRAL, result_settings
    from services.settings import Settings, load_settings

    names = {f.name for f in dataclasses.fields(Settings)}
    assert RESULT_NEUTRAL <= names  # no misspelt name that would leave a setting in
    s = load_settings(environ={})
    neutral = s.replace(accept_hmac=False, log_level="DEBUG", metrics_port=9100, home="/x")
    assert result_settings(neutral) == result_settings(s)
    for change in ({"learning_rate": 2e-3}, {"min_steps": 4}, {"strategy": "local"}):
        assert result_settings(s.replace(**change)) != result_settings(s)


def test_enroll_flan_enrolls_each_client_with_its_tasks_test_records(
    mixed_folder, embedded_settings
):
    """Issue 20: `fedvec enroll-flan DIR` enrolls the folder's multiple-choice clients, each
    with its own task's test records (test.jsonl mixes every task); again, it refuses and
    changes nothing."""
    from click.testing import CliRunner

    from services import operations as ops
    from services.cli import cli

    env = {"FEDVEC_HOME": embedded_settings.home}
    run = CliRunner().invoke(cli, ["enroll-flan", str(mixed_folder), "--json"], env=env)
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert [(c["name"], c["num_examples"], c["num_test_examples"]) for c in out["clients"]] == [
        ("flan-3-colours", 40, 9),
        ("flan-12-yesno", 30, 7),
    ]
    assert "client 7 (rewrite)" in out["left_out"][0] and "private_key" not in run.output
    test_file = Path(out["clients"][0]["test_path"])
    assert {e.answer for e in load_examples(test_file)} <= {"red", "green", "blue"}
    before = test_file.read_bytes()
    again = CliRunner().invoke(
        cli, ["enroll-flan", str(mixed_folder), "--test-per-client", "2"], env=env
    )
    assert again.exit_code == 2 and "already enrolled: flan-12-yesno, flan-3-colours" in (
        again.output
    )
    assert test_file.read_bytes() == before and len(ops.list_clients(embedded_settings)) == 2
    missing = CliRunner().invoke(cli, ["enroll-flan", str(mixed_folder / "nope")], env=env)
    assert missing.exit_code == 2 and "is not at" in missing.output
