"""Client data files: what loads, what is converted, and every way a file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services import client_data
from services.client_data import (
    ClientDataError,
    Example,
    example_from_record,
    load_examples,
    summarize,
    task_kind,
    write_jsonl,
)

GOOD = {"prompt": "Shares rose 5%", "options": ["business", "tech"], "answer": "business"}
GEN = {"prompt": "Add punctuation: hello world", "answer": "Hello, world."}
FLAN_INSTRUCTION = (
    "Sentence 1: The two streets connect.\nSentence 2: Our computers connected.\n"
    "Does connect mean the same thing in these two sentences?\n"
    "OPTIONS:\n- different meanings\n- the same meaning"
)
FLAN = {
    "instruction": FLAN_INSTRUCTION,
    "output": "different meanings",
    "task": "wic",
    "category": "word_disambiguation",
}
FLAN_GEN = {
    "instruction": "Add punctuation to the following sentence: Doctors diagnose it\n",
    "output": "Doctors diagnose it. ",
    "task": "fix_punct",
    "category": "text_formatting",
}


def jsonl(tmp_path: Path, *rows, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refused(path: Path, *words: str) -> str:
    """load_examples(path) raises ClientDataError naming the path and all the words."""
    with pytest.raises(ClientDataError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


# --- what loads ---


def test_jsonl_with_blank_lines(tmp_path):
    second = {"prompt": "New phone", "options": ["business", "tech"], "answer": "tech"}
    path = jsonl(tmp_path, GOOD, "", "   ", second)
    examples = load_examples(path)
    assert examples == [
        Example("Shares rose 5%", ("business", "tech"), "business"),
        Example("New phone", ("business", "tech"), "tech"),
    ]
    assert [ex.label for ex in examples] == [0, 1]


def test_json_list_and_str_path(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=2), encoding="utf-8")
    expected = Example("Shares rose 5%", ("business", "tech"), "business")
    assert load_examples(str(path)) == [expected, expected]


def test_utf8_bom_crlf_and_unknown_fields(tmp_path):
    path = tmp_path / "bom.jsonl"
    row = dict(GOOD, prompt="Café prices ↑", id=7)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\r\n")
    assert load_examples(path)[0].prompt == "Café prices ↑"


def test_flan_record_is_converted(tmp_path):
    [ex] = load_examples(jsonl(tmp_path, FLAN))
    assert ex.options == ("different meanings", "the same meaning")
    assert ex.answer == "different meanings" and ex.label == 0
    assert ex.prompt.endswith("Does connect mean the same thing in these two sentences?")
    assert ex.prompt.startswith("Sentence 1:")
    assert "OPTIONS" not in ex.prompt and ex.prompt == ex.prompt.strip()


def test_flan_list_file_with_blank_line_before_options(tmp_path):
    record = dict(FLAN, instruction="Is it fine?\n\nOPTIONS:\n- no\n- yes\n", output="yes")
    path = tmp_path / "train_client_2.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    assert load_examples(path) == [Example("Is it fine?", ("no", "yes"), "yes")]


def test_write_jsonl_round_trip_and_summarize(tmp_path):
    examples = [
        Example("é ünïcode", ("a", "b", "c"), "c"),
        Example("two", ("a", "b", "c"), "a"),
        Example("three", ("a", "b", "c"), "c"),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, iter(examples))
    assert load_examples(path) == examples
    summary = summarize(examples)
    assert summary == {"count": 3, "options": ["a", "b", "c"], "labels": {"c": 2, "a": 1}}
    assert task_kind(examples) == "multiple_choice"


# --- generation records ---


def test_generation_record_without_options(tmp_path):
    examples = load_examples(jsonl(tmp_path, GEN, dict(GEN, id=3)))
    assert examples == [Example("Add punctuation: hello world", (), "Hello, world.")] * 2
    assert examples[0].is_generation and not Example("p", ("a", "b"), "a").is_generation
    assert task_kind(examples) == "generation"
    with pytest.raises(ValueError, match="generation example has no option label"):
        _ = examples[0].label


def test_flan_record_without_options_is_generation(tmp_path):
    [ex] = load_examples(jsonl(tmp_path, FLAN_GEN))
    assert ex == Example(
        "Add punctuation to the following sentence: Doctors diagnose it", (), "Doctors diagnose it."
    )
    assert ex.is_generation


def test_generation_round_trip_and_summarize(tmp_path):
    examples = [Example("é ünïcode", (), "target one"), Example("two", (), "target two")]
    path = tmp_path / "gen.jsonl"
    write_jsonl(path, examples)
    assert "options" not in path.read_text(encoding="utf-8")
    assert load_examples(path) == examples
    assert summarize(examples) == {"count": 2, "options": [], "labels": {}}


def test_task_kind_refuses_nothing_and_mixtures():
    with pytest.raises(ValueError, match="no examples"):
        task_kind([])
    with pytest.raises(ValueError, match="mix"):
        task_kind([Example("p", (), "t"), Example("p", ("a", "b"), "a")])


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ((GOOD, GOOD, GEN), ("line 3", "a generation record", "multiple-choice records (line 1)")),
        ((FLAN_GEN, FLAN), ("line 2", "a multiple-choice record", "generation records (line 1)")),
    ],
)
def test_file_mixing_the_two_kinds_is_refused(tmp_path, rows, words):
    refused(jsonl(tmp_path, *rows), *words, "one kind of task")


def test_mixed_json_list_names_records(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([GEN, GOOD]))
    refused(path, "record 2", "generation records (record 1)")


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"prompt": "p"}, ("missing field 'answer'",)),
        ({"answer": "a"}, ("missing field 'prompt'",)),
        (dict(GEN, answer=" \n"), ("'answer' is empty",)),
        (dict(GEN, prompt=""), ("'prompt' is empty",)),
        (dict(GEN, answer=["a"]), ("'answer' must be a string", "got a list")),
        (dict(GEN, options=[]), ("needs 2 to 16 options", "got 0")),
    ],
)
def test_bad_generation_record(tmp_path, record, words):
    refused(jsonl(tmp_path, record), "line 1", *words)


def test_generation_field_too_long(tmp_path, monkeypatch):
    monkeypatch.setattr(client_data, "MAX_FIELD_CHARS", 50)
    refused(jsonl(tmp_path, dict(GEN, answer="x" * 51)), "answer is 51 characters")


# --- what is refused ---


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.jsonl", "no such file")


def test_directory(tmp_path):
    refused(tmp_path, "directory")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    refused(path, "empty")


def test_empty_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    refused(path, "no records")


def test_file_over_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(client_data, "MAX_FILE_BYTES", 100)
    path = jsonl(tmp_path, *[GOOD] * 5)
    refused(path, "over the limit", "100 bytes")


def test_invalid_json_line_number(tmp_path):
    path = jsonl(tmp_path, GOOD, "", '{"prompt": "x", "options": [}')
    refused(path, "line 3", "invalid JSON")


def test_invalid_json_in_list_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "x"},\n  {"prompt": }\n]')
    refused(path, "line 3", "invalid JSON")


def test_pretty_printed_single_object_gets_a_hint(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD, indent=2))
    refused(path, "line 1", "invalid JSON", "single JSON object")


def test_absurd_json_is_still_a_client_data_error(tmp_path):
    refused(jsonl(tmp_path, "[" * 100_000 + "]" * 100_000), "invalid JSON", "too deeply")
    refused(jsonl(tmp_path, GOOD, '{"a":' * 100_000 + "1" + "}" * 100_000), "line 2", "too deeply")
    refused(jsonl(tmp_path, '{"prompt": ' + "9" * 5000 + "}"), "line 1", "invalid JSON")


@pytest.mark.parametrize("record", [[1, 2], '"text"', 3, None])
def test_record_not_an_object(tmp_path, record):
    refused(jsonl(tmp_path, GOOD, record), "line 2", "must be a JSON object")


@pytest.mark.parametrize("field", ["prompt", "answer"])
def test_missing_field(tmp_path, field):
    record = {k: v for k, v in GOOD.items() if k != field}
    refused(jsonl(tmp_path, record), "line 1", "missing field", repr(field))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("prompt", 5, ("'prompt' must be a string", "got a number")),
        ("prompt", ["x"], ("'prompt' must be a string", "got a list")),
        ("options", "business,tech", ("'options' must be a list", "got a string")),
        ("options", ["business", 2], ("option 2 must be a string",)),
        ("answer", 0, ("'answer' must be a string",)),
        ("answer", None, ("'answer' must be a string", "got null")),
    ],
)
def test_wrongly_typed_field(tmp_path, field, value, words):
    refused(jsonl(tmp_path, dict(GOOD, **{field: value})), "line 1", *words)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(tmp_path, prompt):
    refused(jsonl(tmp_path, dict(GOOD, prompt=prompt)), "line 1", "'prompt' is empty")


@pytest.mark.parametrize("options", [[], ["business"]])
def test_fewer_than_two_options(tmp_path, options):
    record = dict(GOOD, options=options, answer="business")
    refused(jsonl(tmp_path, record), "line 1", "needs 2 to 16 options", f"got {len(options)}")


def test_too_many_options(tmp_path):
    options = [f"o{i}" for i in range(17)]
    refused(jsonl(tmp_path, dict(GOOD, options=options, answer="o1")), "got 17")


def test_empty_option(tmp_path):
    refused(jsonl(tmp_path, dict(GOOD, options=["business", " "])), "option 2 is empty")


def test_duplicate_options(tmp_path):
    record = dict(GOOD, options=["business", "tech", "business"])
    refused(jsonl(tmp_path, record), "line 1", "duplicate options", "'business'")


def test_answer_not_in_options(tmp_path):
    path = jsonl(tmp_path, GOOD, GOOD, dict(GOOD, answer="sport"))
    message = refused(path, "line 3")
    assert message == (
        f"{path} line 3: 'answer' 'sport' is not one of the options ['business', 'tech']"
    )


def test_record_number_in_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, dict(GOOD, answer="sport")]))
    refused(path, "record 2", "not one of the options")


@pytest.mark.parametrize("field", ["prompt", "option", "answer"])
def test_field_too_long(tmp_path, monkeypatch, field):
    monkeypatch.setattr(client_data, "MAX_FIELD_CHARS", 50)
    long = "x" * 51
    if field == "prompt":
        record = dict(GOOD, prompt=long)
    else:
        answer = long if field == "answer" else "business"
        record = dict(GOOD, options=["business", long], answer=answer)
    message = refused(jsonl(tmp_path, record), "line 1", "51 characters", "limit of 50")
    assert len(message) < 300


def test_more_than_max_records_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(client_data, "MAX_RECORDS", 3)
    assert len(load_examples(jsonl(tmp_path, *[GOOD] * 3))) == 3
    refused(jsonl(tmp_path, *[GOOD] * 4), "line 4", "more than the limit of 3 records")


def test_more_than_max_records_json_list(tmp_path, monkeypatch):
    monkeypatch.setattr(client_data, "MAX_RECORDS", 3)
    path = tmp_path / "many.json"
    path.write_text(json.dumps([GOOD] * 4))
    refused(path, "4 records", "limit of 3")


def test_undecodable_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = json.dumps(dict(GOOD, prompt="caf\xe9"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad)
    refused(path, "line 2", "not valid UTF-8")


def test_flan_answer_not_in_options(tmp_path):
    refused(jsonl(tmp_path, dict(FLAN, output="maybe")), "line 1", "'maybe' is not one of")


@pytest.mark.parametrize("drop", ["output", "instruction_type"])
def test_flan_bad_fields(tmp_path, drop):
    record = {k: v for k, v in FLAN.items() if k != "output"}
    if drop == "instruction_type":
        record = dict(FLAN, instruction=["OPTIONS:"])
    refused(jsonl(tmp_path, record), "line 1", "FLAN")


def test_example_from_record_uses_where():
    assert example_from_record(FLAN, "here").label == 0
    with pytest.raises(ClientDataError, match=r"^somewhere record 9: missing field 'answer'"):
        example_from_record({"prompt": "p", "options": ["a", "b"]}, "somewhere record 9")
    assert example_from_record(FLAN_GEN, "here").is_generation
