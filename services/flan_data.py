"""Clients from any FLAN-format folder, read in place (never copied into the repository).

A folder holds train_client_K.json (a JSON list of FLAN records per client, any number of
clients, K = 0, 1, ...) and test.jsonl (records of every task, one JSON object a line,
each with its `task`). Nothing here knows a task name or a client index: whether a client
is multiple choice is read from its records (every one lists its answers after an
`OPTIONS:` line), and a client's test split is the test records of its task.

Each client's records are shuffled with a fixed seed (FLAN train files are often sorted by
answer, so a prefix would hold one label), then cut from the end: `validation` records
for choosing settings, `reserve` records kept for a client that enrolls late, and the rest
for training, optionally cut into `shards` disjoint data-scarce clients of one task.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.client_data import (
    GENERATION,
    ClientDataError,
    ClientSpec,
    Example,
    example_from_record,
    task_kind,
    write_jsonl,
)

_TRAIN_FILE = re.compile(r"train_client_(\d+)\.json")


@dataclass(frozen=True)
class FlanClient:
    """One train_client_K.json: its task and its records in the fixed shuffled order."""

    index: int
    task: str
    category: str
    examples: list[Example]

    @property
    def multiple_choice(self) -> bool:
        return task_kind(self.examples) != GENERATION


@dataclass
class FlanClients:
    """What `build_flan_clients` made, and what it left out and why."""

    clients: list[ClientSpec]
    # per task: records held out of training (validation), and kept for a late client
    validation: dict[str, list[Example]] = field(default_factory=dict)
    reserve: dict[str, list[Example]] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)


def _missing(what: Path, root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"the FLAN folder is not complete: {what} is missing. The folder is expected at "
        f"{root} and holds train_client_K.json (K = 0, 1, ...) and test.jsonl"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ClientDataError(f"{path}: invalid JSON: {exc}") from None


def train_files(data_dir: str | Path) -> dict[int, Path]:
    """K -> train_client_K.json, in the order of K."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"the FLAN folder is not at {root}: it is expected there and holds "
            "train_client_K.json (K = 0, 1, ...) and test.jsonl"
        )
    found = {int(m.group(1)): p for p in root.iterdir() if (m := _TRAIN_FILE.fullmatch(p.name))}
    if not found:
        raise _missing(root / "train_client_0.json", root)
    return dict(sorted(found.items()))


def read_flan_client(path: Path, index: int) -> FlanClient:
    """A client's records, converted and checked, in a fixed shuffled order (seeded by K)."""
    records = _read_json(path)
    if not isinstance(records, list) or not records:
        raise ClientDataError(f"{path}: expected a non-empty JSON list of records")
    tasks = {r.get("task") for r in records if isinstance(r, dict)}
    if len(tasks) != 1 or not isinstance(next(iter(tasks)), str):
        raise ClientDataError(f"{path}: expected records of one task, got {tasks}")
    examples = [example_from_record(r, f"{path} record {i + 1}") for i, r in enumerate(records)]
    try:
        task_kind(examples)
    except ValueError as exc:
        raise ClientDataError(f"{path}: {exc}") from None
    random.Random(index).shuffle(examples)
    return FlanClient(index, tasks.pop(), str(records[0].get("category", "")), examples)


def read_test_records(test_file: Path, tasks: set[str]) -> dict[str, list[Example]]:
    """task -> its test examples, in file order, for the given tasks."""
    if not test_file.is_file():
        raise _missing(test_file, test_file.parent)
    test: dict[str, list[Example]] = {task: [] for task in tasks}
    for n, line in enumerate(test_file.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ClientDataError(f"{test_file} line {n}: invalid JSON: {exc}") from None
        if isinstance(record, dict) and record.get("task") in tasks:
            test[record["task"]].append(example_from_record(record, f"{test_file} line {n}"))
    return test


def shard(examples: list[Example], n: int) -> list[list[Example]]:
    """`examples` cut in order into n disjoint parts whose sizes differ by at most one."""
    if n < 1:
        raise ValueError(f"shards must be at least 1, got {n}")
    if len(examples) < n:
        raise ValueError(f"{len(examples)} records cannot make {n} shards")
    size, extra = divmod(len(examples), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(examples[start:end])
        start = end
    return out


def build_flan_clients(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    train_per_client: int | None = None,
    test_per_client: int | None = None,
    shards: int = 1,
    validation: int = 0,
    reserve: int = 0,
    generation: bool = False,
) -> FlanClients:
    """The folder's clients as files under out_dir/<name>/ (train, test, validation).

    Per train file: `validation` records, then `reserve` records, are cut from the end of
    the shuffled list; of the rest, the first `train_per_client` (None: all) are cut into
    `shards` clients. Generation clients are included only with `generation` (they need a
    causal LM); otherwise they are listed in `left_out`."""
    root = Path(data_dir).expanduser()
    files = train_files(root)
    result = FlanClients(clients=[])
    chosen: list[tuple[FlanClient, list[Example]]] = []
    for k, path in files.items():
        client = read_flan_client(path, k)
        if not client.multiple_choice and not generation:
            result.left_out.append(
                f"client {k} ({client.task}): a generation task, which the encoder cannot "
                "score (FEDVEC_MODEL_KIND=causal-lm scores it by ROUGE-L)"
            )
            continue
        held = validation + reserve
        if len(client.examples) - held < shards:
            raise ClientDataError(
                f"{path}: {len(client.examples)} records are too few for {validation} "
                f"validation, {reserve} reserved and {shards} shard(s)"
            )
        cut = len(client.examples) - held
        result.validation.setdefault(client.task, []).extend(client.examples[cut + reserve :])
        result.reserve.setdefault(client.task, []).extend(client.examples[cut : cut + reserve])
        chosen.append((client, client.examples[:cut][:train_per_client]))
    test = read_test_records(root / "test.jsonl", {c.task for c, _ in chosen})
    out = Path(out_dir)
    for client, train in chosen:
        if not test[client.task]:
            raise ClientDataError(
                f"{root / 'test.jsonl'}: no test records for task {client.task!r} "
                f"(client {client.index})"
            )
        parts = shard(train, shards)
        for j, part in enumerate(parts):
            suffix = f".{j}" if shards > 1 else ""
            name = f"flan-{client.index}{suffix}-{client.task}"
            base = out / name
            write_jsonl(base / "train.jsonl", part)
            write_jsonl(base / "test.jsonl", test[client.task][:test_per_client])
            val_path = None
            if validation:
                val_path = base / "validation.jsonl"
                write_jsonl(val_path, client.examples[len(client.examples) - validation :])
            what = f"shard {j + 1}/{shards} of " if shards > 1 else ""
            result.clients.append(
                ClientSpec(
                    name=name,
                    task=client.task,
                    train_path=base / "train.jsonl",
                    test_path=base / "test.jsonl",
                    validation_path=val_path,
                    description=f"{what}FLAN client {client.index}: {client.task} "
                    f"({client.category}), {len(part)} records",
                )
            )
    return result
