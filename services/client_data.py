"""Client data files: multiple-choice records, checked whole before anything uses them."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_RECORDS = 100_000
MAX_FIELD_CHARS = 20_000
MAX_FILE_BYTES = 200 * 2**20
MAX_OPTIONS = 16


class ClientDataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    prompt: str
    options: tuple[str, ...]
    answer: str

    @property
    def label(self) -> int:
        return self.options.index(self.answer)


def _flan(record: dict[str, Any], where: str) -> dict[str, Any]:
    """FLAN record -> prompt/options/answer (options listed after an `OPTIONS:` line)."""
    text, output = record.get("instruction"), record.get("output")
    if not isinstance(text, str) or not isinstance(output, str):
        raise ClientDataError(f"{where}: 'instruction' and 'output' must be strings")
    lines = text.split("\n")
    if "OPTIONS:" not in [ln.strip() for ln in lines]:
        raise ClientDataError(
            f"{where}: a FLAN record without OPTIONS: is a generation task; generation "
            "tasks need the causal-LM path and are not supported by the encoder"
        )
    cut = [ln.strip() for ln in lines].index("OPTIONS:")
    options = [ln.strip()[2:].strip() for ln in lines[cut + 1 :] if ln.strip().startswith("- ")]
    return {"prompt": "\n".join(lines[:cut]).strip(), "options": options, "answer": output.strip()}


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise ClientDataError(
            f"{where}: a record must be a JSON object, got {type(record).__name__}"
        )
    if "instruction" in record and "prompt" not in record:
        record = _flan(record, where)
    prompt, options, answer = record.get("prompt"), record.get("options"), record.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ClientDataError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(options, list) or not all(isinstance(o, str) and o for o in options):
        raise ClientDataError(f"{where}: 'options' must be a list of non-empty strings")
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise ClientDataError(f"{where}: needs 2 to {MAX_OPTIONS} options, got {len(options)}")
    if len(set(options)) != len(options):
        raise ClientDataError(f"{where}: duplicate options {options}")
    if not isinstance(answer, str):
        raise ClientDataError(f"{where}: 'answer' must be a string")
    if answer not in options:
        raise ClientDataError(f"{where}: 'answer' {answer!r} is not one of the options {options}")
    for text in (prompt, *options):
        if len(text) > MAX_FIELD_CHARS:
            raise ClientDataError(f"{where}: a field is over {MAX_FIELD_CHARS} characters")
    return Example(prompt=prompt, options=tuple(options), answer=answer)


def load_examples(path: str | os.PathLike) -> list[Example]:
    p = Path(path)
    if not p.exists():
        raise ClientDataError(f"{p}: no such file")
    if not p.is_file():
        raise ClientDataError(f"{p}: not a file")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ClientDataError(f"{p}: {size} bytes, over the limit of {MAX_FILE_BYTES}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientDataError(f"{p}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise ClientDataError(f"{p}: the file is empty")
    records: list[tuple[Any, str]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientDataError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        records = [(r, f"{p} record {i + 1}") for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{p} line {n}"))
            except json.JSONDecodeError as exc:
                raise ClientDataError(f"{p} line {n}: invalid JSON: {exc.msg}") from None
            if len(records) > MAX_RECORDS:
                break
    if not records:
        raise ClientDataError(f"{p}: no records")
    if len(records) > MAX_RECORDS:
        raise ClientDataError(f"{p}: more than {MAX_RECORDS} records")
    return [_example(r, where) for r, where in records]


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for ex in examples:
            row = {"prompt": ex.prompt, "options": list(ex.options), "answer": ex.answer}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def summarize(examples: list[Example]) -> dict[str, Any]:
    return {
        "count": len(examples),
        "options": sorted({o for ex in examples for o in ex.options}),
        "labels": dict(Counter(ex.answer for ex in examples)),
    }
