"""Client data files: multiple-choice or generation records, checked whole before anything
uses them.

A multiple-choice record is ``{"prompt": str, "options": [str, ...], "answer": str}`` (the
answer is one of 2 to 16 unique options); a generation record is ``{"prompt": str,
"answer": str}`` (no "options" key; the answer is the target text). A file is JSON Lines
(one object a line, blank lines ignored) or a JSON list of objects, and holds one kind of
record only (a client has one task). FLAN records (``instruction``, ``output`` the gold
answer) are converted: multiple-choice when the instruction lists its answers after an
``OPTIONS:`` line as ``- answer`` lines, generation otherwise. Anything wrong is a
:class:`ClientDataError` naming the file, the record and the problem.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MAX_RECORDS = 100_000
MAX_FIELD_CHARS = 20_000
MAX_FILE_BYTES = 200 * 2**20
MIN_OPTIONS = 2
MAX_OPTIONS = 16

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
TaskKind = Literal["multiple_choice", "generation"]


class ClientDataError(ValueError):
    """A client data file that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """A multiple-choice example, or with ``options == ()`` a generation example whose
    ``answer`` is the target text."""

    prompt: str
    options: tuple[str, ...]
    answer: str

    @property
    def is_generation(self) -> bool:
        return not self.options

    @property
    def label(self) -> int:
        """Index of the answer among the options."""
        if self.is_generation:
            raise ValueError(
                "a generation example has no option label: its answer is free text "
                f"({_short(self.answer, 60)})"
            )
        return self.options.index(self.answer)


def task_kind(examples: Iterable[Example]) -> TaskKind:
    """The task kind of `examples`: "multiple_choice" or "generation". A ValueError for no
    examples or a mix of the two."""
    kinds = {GENERATION if ex.is_generation else MULTIPLE_CHOICE for ex in examples}
    if not kinds:
        raise ValueError("no examples: the task kind is undefined")
    if len(kinds) > 1:
        raise ValueError("the examples mix multiple-choice and generation tasks")
    return kinds.pop()


def _short(value: Any, limit: int = 120) -> str:
    """repr of a value, cut so that error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _flan(record: dict[str, Any], where: str) -> dict[str, Any]:
    """FLAN record -> prompt/options/answer (options listed after an `OPTIONS:` line), or
    prompt/answer for a generation task (no `OPTIONS:` line)."""
    for key in ("instruction", "output"):
        if key not in record:
            raise ClientDataError(f"{where}: FLAN record without {key!r}")
        if not isinstance(record[key], str):
            raise ClientDataError(
                f"{where}: FLAN {key!r} must be a string, got {_type_name(record[key])}"
            )
    lines = record["instruction"].split("\n")
    stripped = [ln.strip() for ln in lines]
    if "OPTIONS:" not in stripped:
        return {"prompt": record["instruction"].strip(), "answer": record["output"].strip()}
    cut = stripped.index("OPTIONS:")
    options = [ln[2:].strip() for ln in stripped[cut + 1 :] if ln.startswith("- ")]
    return {
        "prompt": "\n".join(lines[:cut]).strip(),
        "options": options,
        "answer": record["output"].strip(),
    }


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise ClientDataError(f"{where}: a record must be a JSON object, got {_type_name(record)}")
    if "instruction" in record and "prompt" not in record:
        record = _flan(record, where)
    # No "options" key at all makes a generation record; an empty list is still refused.
    generation = "options" not in record
    fields = (("prompt", str), ("answer", str)) + (() if generation else (("options", list),))
    for key, kind in fields:
        if key not in record:
            raise ClientDataError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], kind):
            want = "a string" if kind is str else "a list of strings"
            got = _type_name(record[key])
            raise ClientDataError(f"{where}: {key!r} must be {want}, got {got}")
    prompt, answer = record["prompt"], record["answer"]
    options = [] if generation else record["options"]
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise ClientDataError(
                f"{where}: option {i + 1} must be a string, got {_type_name(option)}"
            )
    for name, text in (("prompt", prompt), ("answer", answer)) + tuple(
        (f"option {i + 1}", o) for i, o in enumerate(options)
    ):
        if len(text) > MAX_FIELD_CHARS:
            raise ClientDataError(
                f"{where}: {name} is {len(text)} characters, over the limit of {MAX_FIELD_CHARS}"
            )
    if not prompt.strip():
        raise ClientDataError(f"{where}: 'prompt' is empty")
    if generation:
        if not answer.strip():
            raise ClientDataError(f"{where}: 'answer' is empty")
        return Example(prompt=prompt, options=(), answer=answer)
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise ClientDataError(
            f"{where}: needs {MIN_OPTIONS} to {MAX_OPTIONS} options, got {len(options)}"
        )
    for i, option in enumerate(options):
        if not option.strip():
            raise ClientDataError(f"{where}: option {i + 1} is empty")
    duplicates = sorted(o for o, n in Counter(options).items() if n > 1)
    if duplicates:
        raise ClientDataError(f"{where}: duplicate options {_short(duplicates)}")
    if answer not in options:
        raise ClientDataError(
            f"{where}: 'answer' {_short(answer)} is not one of the options {_short(options)}"
        )
    return Example(prompt=prompt, options=tuple(options), answer=answer)


def example_from_record(record: Any, where: str) -> Example:
    """One record (ours or FLAN) -> Example; `where` starts every error message."""
    return _example(record, where)


def _read_text(p: Path) -> str:
    if not p.exists():
        raise ClientDataError(f"{p}: no such file")
    if p.is_dir():
        raise ClientDataError(f"{p}: is a directory, not a data file")
    if not p.is_file():
        raise ClientDataError(f"{p}: not a regular file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ClientDataError(f"{p}: {size} bytes, over the limit of {MAX_FILE_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as exc:
        raise ClientDataError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:  # grew since stat
        raise ClientDataError(f"{p}: over the limit of {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ClientDataError(
            f"{p} line {line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _parse(text: str) -> Any:
    """json.loads, with every failure (bad syntax, absurd nesting or numbers) a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _records(p: Path, text: str) -> list[tuple[Any, str]]:
    if text.lstrip().startswith("["):
        try:
            data = _parse(text)
        except json.JSONDecodeError as exc:
            raise ClientDataError(
                f"{p} line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
        except ValueError as exc:
            raise ClientDataError(f"{p}: invalid JSON: {exc}") from None
        if len(data) > MAX_RECORDS:
            raise ClientDataError(f"{p}: {len(data)} records, more than the limit of {MAX_RECORDS}")
        return [(r, f"{p} record {i + 1}") for i, r in enumerate(data)]
    records: list[tuple[Any, str]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(records) >= MAX_RECORDS:
            raise ClientDataError(f"{p} line {n}: more than the limit of {MAX_RECORDS} records")
        try:
            records.append((_parse(line), f"{p} line {n}"))
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            hint = ""
            if not records:  # a pretty-printed single object, or JSON that is not a list?
                try:
                    whole = _parse(text)
                except ValueError:
                    whole = None
                if isinstance(whole, dict):
                    hint = (
                        " (the file holds a single JSON object; expected a JSON list of "
                        "records, or one record a line)"
                    )
            raise ClientDataError(f"{p} line {n}: invalid JSON: {msg}{hint}") from None
    return records


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read and check a whole client data file (.jsonl, or .json holding a list)."""
    p = Path(path)
    text = _read_text(p)
    if not text.strip():
        raise ClientDataError(f"{p}: the file is empty")
    records = _records(p, text)
    if not records:
        raise ClientDataError(f"{p}: no records")
    examples = [_example(r, where) for r, where in records]
    _check_one_kind(p, examples, [where for _, where in records])
    return examples


def _check_one_kind(p: Path, examples: list[Example], wheres: list[str]) -> None:
    """A client has one task, scored one way: a file must not mix the two kinds."""
    first = examples[0].is_generation
    for ex, where in zip(examples, wheres, strict=True):
        if ex.is_generation != first:
            kind, other = "generation", "multiple-choice"
            if not ex.is_generation:
                kind, other = other, kind
            first_where = wheres[0].removeprefix(f"{p} ")
            raise ClientDataError(
                f"{where}: a {kind} record, but the file starts with {other} records "
                f"({first_where}); a client's file must hold one kind of task"
            )


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples as JSON Lines (UTF-8), creating the parent folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            row: dict[str, Any] = {"prompt": ex.prompt, "answer": ex.answer}
            if not ex.is_generation:
                row["options"] = list(ex.options)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)


def summarize(examples: Iterable[Example]) -> dict[str, Any]:
    """count, the set of options seen (sorted), and how often each answer is the label
    (multiple-choice only: generation answers are free text, so `labels` is empty)."""
    examples = list(examples)
    labels = Counter(ex.answer for ex in examples if not ex.is_generation)
    return {
        "count": len(examples),
        "options": sorted({o for ex in examples for o in ex.options}),
        "labels": dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


@dataclass(frozen=True)
class ClientSpec:
    """One client of a benchmark run: its data files and the task it does."""

    name: str
    task: str
    train_path: Path
    test_path: Path
    description: str
    validation_path: Path | None = None
