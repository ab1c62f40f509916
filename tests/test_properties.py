"""Property-based tests (hypothesis) of what crosses a trust boundary (issue 7): the queue
messages, and the reader of received adapters (safetensors only; wrong keys, shapes, dtypes,
sizes over a limit, NaN/Inf refused before they reach the aggregate)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aggregator.task_vectors import InvalidTaskVector, check_state_dict
from schema.events import (
    EVENTS,
    EvaluateRequest,
    InvalidMessage,
    Message,
    TrainRequest,
    UpdateFailed,
    UpdateStored,
    parse_event,
)
from services.adapter_store import (
    _DTYPES,
    InvalidAdapter,
    decode,
    encode,
    get_state,
    put_state,
    sha256,
)
from services.object_store import LocalFolderStore

# no example database: nothing written into the checkout
FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SLOWER = settings(FAST, max_examples=60)  # examples that write to the object store

# ---------------------------------------------------------------------------- messages

MESSAGES: tuple[type[Message], ...] = (TrainRequest, EvaluateRequest, UpdateStored, UpdateFailed)
KINDS = sorted({m.kind for m in MESSAGES} | set(EVENTS))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(max_size=12),
    "int": st.integers(),
    "int | None": st.none() | st.integers(),
    "str | None": st.none() | st.text(max_size=12),
    "float": st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
    "bool": st.booleans(),
}


def _message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, **{f.name: _FIELD_VALUES[str(f.type)] for f in fields(cls)})


messages = st.one_of([_message_strategy(cls) for cls in MESSAGES])


def _via_json(value: Any) -> Any:
    """What a consumer gets off the queue: the value after a JSON round trip."""
    return json.loads(json.dumps(value))


PARSERS = [("parse_event", parse_event)] + [(cls.__name__, cls.from_dict) for cls in MESSAGES]


@st.composite
def mutated_messages(draw: st.DrawFn) -> Any:
    """A valid message's dict with one field removed, retyped or added, or its kind changed."""
    data = draw(messages).to_dict()
    op = draw(st.sampled_from(["remove", "retype", "extra", "kind"]))
    key = draw(st.sampled_from(sorted(data)))
    if op == "remove":
        del data[key]
    elif op == "retype":
        data[key] = draw(json_values)
    elif op == "extra":
        data[draw(st.text(max_size=8))] = draw(json_values)
    else:
        data["kind"] = draw(st.sampled_from(KINDS) | json_values)
    return data


@FAST
@given(messages)
def test_messages_round_trip_through_json(msg):
    data = _via_json(msg.to_dict())
    assert type(msg).from_dict(data) == msg
    if type(msg) in EVENTS.values():
        assert parse_event(data) == msg


@FAST
@given(st.one_of(json_values, mutated_messages(), messages.map(lambda m: m.to_dict())))
@example({"kind": []})  # an unhashable kind: parse_event raised TypeError
@example({"kind": {"a": 1}})
@example(
    {
        "kind": "update.stored",
        "update_uid": "u",
        "client_id": True,
        "round_id": None,
        "event_id": "e",
    }
)
def test_parsers_return_the_exact_message_or_raise_invalid_message(value):
    data = _via_json(value)
    for name, parse in PARSERS:
        try:
            msg = parse(data)
        except InvalidMessage:
            continue
        # accepted: it is exactly this message, nothing dropped, retyped or added
        assert isinstance(msg, Message), name
        assert msg.to_dict() == data, name
        assert data["kind"] == msg.kind


# ------------------------------------------------------------------------------ adapters

# safetensors' dtype names -> item size; decode knows all of these (this torch has them)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
OTHER_DTYPES = ["C64", "F8_E4M3FNUZ", "F8_E8M0", "F4", "f32", "", "F32 "]  # not decode's
DECODE_DTYPES = set(_DTYPES.values())
assert set(ITEMSIZE) == set(_DTYPES)

# float32 bit patterns: infinities, quiet and signalling NaNs with payloads, -0, denormals
SPECIAL_BITS = [
    0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF,
    0x80000000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF,
]  # fmt: skip
float32_bits = st.sampled_from(SPECIAL_BITS) | st.integers(0, 2**32 - 1)
# names safetensors can write and read back ("__metadata__" is its header's own key)
tensor_names = st.text(max_size=10).filter(lambda s: s != "__metadata__")
small_shapes = st.lists(st.integers(0, 4), max_size=3)


def _raw(t: torch.Tensor) -> torch.Tensor:
    if not t.numel():
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (so NaN payloads count, and NaN == NaN)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(_raw(a[k]), _raw(b[k]))
        for k in a
    )


def read(data: bytes | bytearray, max_bytes: int = 2**20) -> dict[str, torch.Tensor] | None:
    """decode's answer: the tensors, or None for InvalidAdapter. Anything else propagates."""
    try:
        out = decode(data, max_bytes=max_bytes)
    except InvalidAdapter:
        return None
    assert isinstance(out, dict)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())
    return out


def reference(data: bytes) -> dict[str, torch.Tensor] | None:
    """safetensors' own answer; None where it refuses (SafetensorError, or torch refusing a
    shape it declared)."""
    try:
        return st_load(bytes(data))
    except Exception:
        return None


def assert_reads_as_safetensors(data: bytes) -> dict[str, torch.Tensor] | None:
    got = read(data)
    want = reference(data)
    if got is None:
        # decode reads the dtypes of its table; safetensors.torch also complex64 and the
        # "fnuz" float8s, which no adapter has (check_state_dict refuses complex anyway)
        assert want is None or any(t.dtype not in DECODE_DTYPES for t in want.values()), (
            "decode refused a file safetensors reads"
        )
    else:
        assert want is not None, "decode accepted a file safetensors refuses"
        assert same_tensors(got, want)
        # a writable buffer is read in place: the same answer
        assert same_tensors(read(bytearray(data)), got)
    return got


def _file(header: Any, data: bytes = b"", pad: int = 0, ensure_ascii: bool = True) -> bytes:
    text = json.dumps(header, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    text += b" " * pad
    return len(text).to_bytes(8, "little") + text + data


@st.composite
def float32_state_dicts(draw: st.DrawFn, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    out = {}
    for name in draw(st.lists(tensor_names, max_size=max_tensors, unique=True)):
        shape = draw(small_shapes)
        words = draw(st.lists(float32_bits, min_size=math.prod(shape), max_size=math.prod(shape)))
        tensor = torch.from_numpy(np.array(words, dtype=np.uint32).view(np.float32)).reshape(shape)
        if tensor.dim() >= 2 and draw(st.booleans()):
            tensor = tensor.mT.contiguous().mT  # same values, not contiguous
        out[name] = tensor
    return out


@st.composite
def safetensors_parts(draw: st.DrawFn) -> tuple[dict[str, Any], bytes, int]:
    """A well-formed safetensors file as (header, data, padding): random dtypes, shapes,
    header order and packing (not necessarily aligned), random bytes as the values."""
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(tensor_names, max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(small_shapes)
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)
        )
    header = {k: header[k] for k in draw(st.permutations(list(header)))}
    return header, draw(st.binary(min_size=offset, max_size=offset)), draw(st.integers(0, 9))


surrogate_text = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=4
)
bad_counts = st.one_of(
    st.lists(st.integers(-2, 40) | st.sampled_from([2**31, 2**62, 2**63, 2**64]), max_size=4),
    json_values,
)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid safetensors file with one thing wrong (or, sometimes, still right)."""
    header, data, pad = draw(safetensors_parts())
    tensors = [k for k in header if k != "__metadata__"]
    op = draw(
        st.sampled_from(
            ["truncate", "trailing", "flip", "length", "offsets", "shape", "dtype", "field",
             "metadata", "name", "data", "header"]
        )
    )  # fmt: skip
    if op in ("offsets", "shape", "dtype", "field", "name") and tensors:
        name = draw(st.sampled_from(tensors))
        info = header[name]
        if op == "offsets":
            info["data_offsets"] = draw(bad_counts)
        elif op == "shape":
            info["shape"] = draw(bad_counts)
        elif op == "dtype":
            info["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE) + OTHER_DTYPES) | json_values)
        elif op == "field":
            if draw(st.booleans()):
                del info[draw(st.sampled_from(sorted(info)))]
            else:  # extra fields are ignored, but must still be JSON (no NaN, no Infinity)
                info[draw(st.text(max_size=6))] = draw(json_values)
        else:
            header[draw(surrogate_text)] = header.pop(name)
    elif op == "metadata":
        header["__metadata__"] = draw(
            json_values | st.dictionaries(surrogate_text, json_values | surrogate_text)
        )
    elif op == "header":
        header = draw(json_values)
    file = _file(header, data, pad, ensure_ascii=draw(st.booleans()))
    n = int.from_bytes(file[:8], "little")
    if op == "truncate":
        file = file[: draw(st.integers(0, max(0, len(file) - 1)))]
    elif op == "trailing":
        file += draw(st.binary(min_size=1, max_size=16))
    elif op == "flip":
        at = draw(st.integers(0, 8 + n - 1))
        file = file[:at] + bytes([file[at] ^ draw(st.integers(1, 255))]) + file[at + 1 :]
    elif op == "length":
        new = draw(st.integers(max(0, n - 16), n + 16) | st.integers(0, 2**64 - 1))
        file = new.to_bytes(8, "little") + file[8:]
    elif op == "data":
        at = draw(st.integers(8 + n, len(file)))
        if draw(st.booleans()):
            file = file[:at] + draw(st.binary(min_size=1, max_size=8)) + file[at:]
        else:
            file = file[:at] + file[at + draw(st.integers(1, 8)) :]
    return file


ENTRY = {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}


@FAST
@given(st.binary(max_size=200))
@example(b"")
@example(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
# a deeply nested header: json.loads raised RecursionError
@example((200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
def test_decode_of_arbitrary_bytes(data):
    assert_reads_as_safetensors(data)


@FAST
@given(json_values, st.binary(max_size=64))
def test_decode_of_arbitrary_json_headers(header, data):
    assert_reads_as_safetensors(_file(header, data))


@FAST
@given(safetensors_parts())
def test_decode_reads_valid_files_as_safetensors_does(parts):
    header, data, pad = parts
    assert assert_reads_as_safetensors(_file(header, data, pad)) is not None


@FAST
@given(mutated_files())
# a zero-size tensor with a dimension torch cannot hold: torch.empty raised TypeError or
# RuntimeError (safetensors.torch.load raises them too)
@example(_file({"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}))
@example(_file({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}))
@example(_file({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}))
# JSON that Python reads and safetensors (serde_json) refuses: NaN / Infinity tokens, numbers
# out of range, lone surrogates; decode accepted them
@example(_file({"a": {**ENTRY, "x": float("nan")}}, b"\0" * 4))
@example(_file({"a": {**ENTRY, "x": float("-inf")}}, b"\0" * 4))
@example(_file({"\ud800": ENTRY}, b"\0" * 4))
@example(_file({"__metadata__": {"\udc00": "x"}, "a": ENTRY}, b"\0" * 4))
def test_decode_of_mutated_files(data):
    assert_reads_as_safetensors(data)


@FAST
@given(
    float32_state_dicts(),
    # one entry at most: safetensors writes the metadata in its hash map's order
    st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=1),
)
def test_encode_decode_round_trip_bit_exact(state, metadata):
    data = encode(state, metadata)
    # the very bytes safetensors writes (it writes an empty metadata, encode none)
    contiguous = {k: v.contiguous() for k, v in state.items()}
    assert data == st_save(contiguous, metadata=metadata or None)
    assert same_tensors(decode(data, max_bytes=len(data)), state)
    assert same_tensors(decode(bytearray(data), max_bytes=len(data)), state)
    assert same_tensors(st_load(data), state)
    with pytest.raises(InvalidAdapter, match="over the limit"):
        decode(data, max_bytes=len(data) - 1)


# -------------------------------------------------------------------- check_state_dict

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHER_TENSOR_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
                       torch.complex64]  # fmt: skip


@st.composite
def expected_and_valid(draw: st.DrawFn) -> tuple[dict[str, tuple[int, ...]], dict]:
    names = draw(st.lists(st.text(max_size=8), min_size=1, max_size=4, unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    expected, sd = {}, {}
    for name in names:
        shape = tuple(draw(small_shapes))
        expected[name] = shape
        values = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
        sd[name] = values.to(draw(st.sampled_from(FLOAT_DTYPES)))
    return expected, sd


@FAST
@given(expected_and_valid())
def test_check_state_dict_accepts_valid(case):
    expected, sd = case
    check_state_dict(sd, expected)


@FAST
@given(
    expected_and_valid(),
    st.sampled_from(["missing", "extra", "shape", "dtype", "nan", "inf", "not a tensor"]),
    st.data(),
)
def test_check_state_dict_refuses_each_fault(case, fault, data):
    expected, sd = case
    sd = dict(sd)
    key = data.draw(st.sampled_from(sorted(sd)))
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        key = data.draw(st.text(max_size=8).filter(lambda k: k not in expected))
        sd[key] = torch.zeros(2)
    elif fault == "shape":
        shape = tuple(data.draw(small_shapes.filter(lambda s: tuple(s) != expected[key])))
        sd[key] = torch.zeros(shape, dtype=sd[key].dtype)
    elif fault == "dtype":
        sd[key] = sd[key].to(data.draw(st.sampled_from(OTHER_TENSOR_DTYPES)))
    elif fault in ("nan", "inf"):
        candidates = sorted(k for k in sd if sd[k].numel())
        assume(candidates)
        key = data.draw(st.sampled_from(candidates))
        bad = float("nan") if fault == "nan" else data.draw(st.sampled_from([math.inf, -math.inf]))
        tensor = sd[key].clone()
        tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = bad
        sd[key] = tensor
    else:
        sd[key] = sd[key].tolist()
    with pytest.raises(InvalidTaskVector) as exc:
        check_state_dict(sd, expected)
    assert repr(key) in str(exc.value)


# ---------------------------------------------------------------- get_state (the store)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalFolderStore:
    return LocalFolderStore(tmp_path_factory.mktemp("property-store"))


KEY = "clients/1/updates/property/adapter.safetensors"
hex_digests = st.text("0123456789abcdef", min_size=64, max_size=64)


@SLOWER
@given(float32_state_dicts(), st.integers(-64, 64), hex_digests)
def test_get_state_size_limit_and_checksum(store, state, slack, other_sha):
    sha = put_state(store, KEY, state)
    size = store.size(KEY)
    assert sha == sha256(store.get(KEY))
    limit = max(0, size + slack)
    if limit < size:
        with pytest.raises(InvalidAdapter, match="over the limit"):
            get_state(store, KEY, max_bytes=limit, expected_sha256=sha)
    else:
        assert same_tensors(get_state(store, KEY, max_bytes=limit, expected_sha256=sha), state)
        assert same_tensors(get_state(store, KEY, max_bytes=limit), state)
    assume(other_sha != sha)
    with pytest.raises(InvalidAdapter, match="sha256"):
        get_state(store, KEY, max_bytes=size, expected_sha256=other_sha)


@SLOWER
@given(float32_state_dicts(), mutated_files())
def test_get_state_of_received_bytes(store, state, received):
    # bytes that replaced a recorded state are refused by their checksum, valid or not
    sha = put_state(store, KEY, state)
    store.put(KEY, received)
    if sha256(received) != sha:
        with pytest.raises(InvalidAdapter):
            get_state(store, KEY, max_bytes=2**20, expected_sha256=sha)
    # with their own checksum they read as decode reads them, or are refused the same way
    want = read(received)
    try:
        got = get_state(store, KEY, max_bytes=2**20, expected_sha256=sha256(received))
    except InvalidAdapter:
        assert want is None
    else:
        assert want is not None and same_tensors(got, want)
