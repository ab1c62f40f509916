"""One behavioural suite run against both object-store backends (local folder, S3 via moto)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import threading
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services import adapter_store as ads
from services import object_store
from services.bench.common import MIB, minilm_lora_state, synthetic_state
from services.object_store import (
    LocalFolderStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLarge,
    S3Store,
    open_object_store,
)
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

BIG = 12 * 1024 * 1024  # above minio's 5 MiB part size: a multipart upload on S3

INVALID_KEYS = [
    "",
    "/abs/key",
    "a/../b",
    "..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "a/.tmp-x",
]


@pytest.fixture(params=["local", "s3"])
def store(request) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_put_get_round_trip(store: ObjectStore) -> None:
    key = "clients/3/updates/ab12/adapter.safetensors"
    data = bytes(range(256)) * 10
    store.put(key, data)
    assert store.get(key) == data
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.size("empty") == 0


def test_overwrite_replaces_content(store: ObjectStore) -> None:
    store.put("k/v", b"first version")
    store.put("k/v", b"second")
    assert store.get("k/v") == b"second"
    assert store.size("k/v") == len(b"second")
    assert store.list() == ["k/v"]


def test_exists_and_size(store: ObjectStore) -> None:
    assert not store.exists("a/b")
    store.put("a/b", b"12345")
    assert store.exists("a/b")
    assert store.size("a/b") == 5
    # A "folder" of keys is not itself an object.
    assert not store.exists("a")
    with pytest.raises(ObjectNotFound):
        store.size("a/missing")


def test_list_prefixes_recursive_sorted(store: ObjectStore) -> None:
    keys = ["clients/10/x", "clients/2/b/c/d", "clients/1/a", "clients/1/updates/u1/w", "top"]
    for key in keys:
        store.put(key, key.encode())
    # Exactly the objects written: no temp files, no folders.
    assert store.list() == sorted(keys)
    assert store.list("clients/1/") == ["clients/1/a", "clients/1/updates/u1/w"]
    # A plain string prefix, as in S3: "clients/1" also matches "clients/10/...".
    assert store.list("clients/1") == ["clients/1/a", "clients/1/updates/u1/w", "clients/10/x"]
    assert store.list("clients/2/b/c/") == ["clients/2/b/c/d"]
    assert store.list("nothing/") == []
    assert store.list("to") == ["top"]


def test_delete(store: ObjectStore) -> None:
    store.put("d/one", b"1")
    store.put("d/two", b"2")
    store.delete("d/one")
    assert not store.exists("d/one")
    assert store.list() == ["d/two"]
    store.delete("d/one")  # already gone: fine
    store.delete("never/existed")
    with pytest.raises(ObjectNotFound):
        store.get("d/one")


def test_get_missing_names_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get("clients/9/missing.bin")
    assert "clients/9/missing.bin" in str(info.value)
    assert store.describe() in str(info.value)
    assert isinstance(info.value, ObjectStoreError)


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_rejected(store: ObjectStore, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put(key, b"x"),
        lambda: store.put_file(key, src),
        lambda: store.get(key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert store.list() == []


def test_put_file_get_file_big(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(BIG))
    store.put_file("blobs/big.bin", src)
    assert store.size("blobs/big.bin") == BIG
    dest = tmp_path / "out" / "nested" / "big.bin"
    store.get_file("blobs/big.bin", dest)
    assert _sha256(dest) == _sha256(src)
    # get_file replaces an existing file and leaves no temp file next to it.
    dest.write_bytes(b"stale")
    store.get_file("blobs/big.bin", dest)
    assert _sha256(dest) == _sha256(src)
    assert os.listdir(dest.parent) == ["big.bin"]


def test_get_file_missing_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "missing.bin"
    dest.parent.mkdir()
    with pytest.raises(ObjectNotFound, match="nope/missing.bin"):
        store.get_file("nope/missing.bin", dest)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_readers_never_see_half_written_objects(store: ObjectStore) -> None:
    versions = [b"A" * 256 * 1024, b"B" * 256 * 1024]
    store.put("hot", versions[0])
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(20):
                store.put("hot", versions[i % 2])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not done.is_set() or reads < 5:
        assert store.get("hot") in versions
        reads += 1
    thread.join()
    assert not errors
    assert store.list() == ["hot"]


# --- backend-specific details -------------------------------------------------------------


def test_local_skips_temp_files_and_cleans_up_on_failure(local_store: LocalFolderStore) -> None:
    root = Path(local_store.root)
    local_store.put("a/b", b"1")
    # A temp file left behind by a crashed writer is never listed.
    (root / ".tmp-crashed").write_bytes(b"junk")
    (root / "a" / ".tmp-other").write_bytes(b"junk")
    assert local_store.list() == ["a/b"]
    assert local_store.list("a/") == ["a/b"]
    (root / ".tmp-crashed").unlink()
    (root / "a" / ".tmp-other").unlink()
    # A write that fails half-way removes its temp file and keeps the old object.
    with pytest.raises(TypeError):
        local_store.put("a/b", "not bytes")  # type: ignore[arg-type]
    assert os.listdir(root / "a") == ["b"]
    assert local_store.get("a/b") == b"1"


def test_local_describe_and_root_created(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "x" / "objects")
    assert (tmp_path / "x" / "objects").is_dir()
    assert store.describe() == f"local folder {tmp_path / 'x' / 'objects'}"


def test_s3_backend_error_is_wrapped(s3_endpoint: str) -> None:
    bucket = f"test-{uuid.uuid4().hex}"
    store = S3Store(s3_endpoint, bucket, S3_ACCESS_KEY, S3_SECRET_KEY)
    store._client.remove_bucket(bucket)  # the bucket vanishes behind the store's back
    with pytest.raises(ObjectStoreError) as info:
        store.put("k/x", b"1")
    assert not isinstance(info.value, ObjectNotFound)
    assert "k/x" in str(info.value) and s3_endpoint in str(info.value)


# --- open_object_store --------------------------------------------------------------------


def test_open_file_url(tmp_path: Path) -> None:
    store = open_object_store(f"file://{tmp_path}/objs")
    assert isinstance(store, LocalFolderStore)
    assert store.root == str(tmp_path / "objs")
    store.put("a", b"1")
    assert (tmp_path / "objs" / "a").read_bytes() == b"1"


def test_open_plain_path(tmp_path: Path) -> None:
    store = open_object_store(str(tmp_path / "plain"))
    assert isinstance(store, LocalFolderStore)
    assert store.describe() == f"local folder {tmp_path / 'plain'}"


def test_open_s3_url_applies_prefix(s3_endpoint: str) -> None:
    bucket = f"test-{uuid.uuid4().hex}"
    store = open_object_store(
        f"s3://{bucket}/some/prefix/",
        s3_endpoint=s3_endpoint,
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
    )
    assert isinstance(store, S3Store)
    assert store.describe() == f"s3 http://{s3_endpoint} bucket {bucket} prefix some/prefix"
    store.put("a/b", b"data")
    assert store.list() == ["a/b"]
    # Seen without a prefix, the object sits under it in the bucket.
    raw = S3Store(s3_endpoint, bucket, S3_ACCESS_KEY, S3_SECRET_KEY)
    assert raw.list() == ["some/prefix/a/b"]
    assert raw.get("some/prefix/a/b") == b"data"


def test_open_s3_without_endpoint_fails_clearly() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        open_object_store("s3://bucket/prefix")


@pytest.mark.parametrize("url", ["", "s3:///no-bucket", "gs://bucket", "file://host/x"])
def test_open_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_object_store(url, s3_endpoint="127.0.0.1:1")


# --- bounded reads (get_bounded) and the adapter store over them ----------------------------


def test_get_bounded_reads_whole_object_in_pieces(store: ObjectStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)  # several read chunks
    store.put("b/x", data)
    pieces: list[bytes] = []
    got = store.get_bounded("b/x", len(data), lambda view: pieces.append(bytes(view)))
    assert isinstance(got, memoryview) and not got.readonly and got == data
    assert b"".join(pieces) == data and len(pieces) > 1
    store.put("b/empty", b"")
    assert store.get_bounded("b/empty", 0) == b""
    with pytest.raises(ObjectNotFound, match="b/missing"):
        store.get_bounded("b/missing", 10)


def test_get_bounded_refuses_declared_size_over_limit_before_reading(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("b/x", b"y" * 1000)
    if isinstance(store, S3Store):
        # the size comes from the GET's Content-Length: no HEAD, and no byte of the body read
        monkeypatch.setattr(store._client, "stat_object", _fail("stat_object"))
        monkeypatch.setattr(object_store._S3Body, "readinto", _fail("readinto"))
        monkeypatch.setattr(object_store._S3Body, "read", _fail("read"))
    seen: list[memoryview] = []
    with pytest.raises(ObjectTooLarge, match="1000 bytes, over the limit of 999") as info:
        store.get_bounded("b/x", 999, seen.append)
    assert (info.value.size, info.value.limit) == (1000, 999) and not seen
    assert isinstance(info.value, ObjectStoreError)


def test_s3_get_bounded_without_content_length_stops_at_the_limit(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response that declares no size (chunked) is read up to the limit, no further."""
    data = os.urandom(5 * 1024 * 1024)
    s3_store.put("b/x", data)
    monkeypatch.setattr(object_store._S3Body, "declared_size", staticmethod(lambda r: None))
    assert s3_store.get_bounded("b/x", len(data)) == data
    read: list[int] = []
    original = object_store._S3Body.read

    def counting_read(self, n: int) -> bytes:
        chunk = original(self, n)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(object_store._S3Body, "read", counting_read)
    with pytest.raises(ObjectTooLarge, match="over the limit of 2097152") as info:
        s3_store.get_bounded("b/x", 2 * 1024 * 1024)
    assert info.value.size is None
    assert sum(read) <= 2 * 1024 * 1024 + object_store._CHUNK  # stopped, not read to the end


def test_read_bounded_refuses_bodies_longer_or_shorter_than_declared() -> None:
    read = object_store._read_bounded
    assert read(io.BytesIO(b"abcd"), 4, 10, None, "obj") == b"abcd"
    with pytest.raises(ObjectStoreError, match="longer than its declared 3 bytes"):
        read(io.BytesIO(b"abcd"), 3, 10, None, "obj")
    with pytest.raises(ObjectStoreError, match="ended after 4 of its 6 bytes"):
        read(io.BytesIO(b"abcd"), 6, 10, None, "obj")
    # no declared size: the limit applies to what arrives
    assert read(io.BytesIO(b"abcd"), None, 4, None, "obj") == b"abcd"
    with pytest.raises(ObjectTooLarge, match="over the limit of 3"):
        read(io.BytesIO(b"abcd"), None, 3, None, "obj")


def test_s3_get_bounded_decodes_a_content_encoding(s3_store: S3Store) -> None:
    """An object stored gzip-encoded comes back decoded, its Content-Length not its size."""
    data = b"adapter " * 4096
    packed = gzip.compress(data)
    s3_store._client.put_object(
        s3_store.bucket,
        "b/gz",
        io.BytesIO(packed),
        len(packed),
        metadata={"Content-Encoding": "gzip"},
    )
    assert s3_store.get_bounded("b/gz", len(data)) == data
    with pytest.raises(ObjectTooLarge):
        s3_store.get_bounded("b/gz", len(data) - 1)


def _fail(name: str):
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} must not be called")

    return fail


def test_adapter_size_limit_uses_content_length_without_stat(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = minilm_lora_state()
    sha = ads.put_state(s3_store, "a.safetensors", state)
    size = len(ads.encode(state))
    monkeypatch.setattr(s3_store, "size", _fail("size"))
    monkeypatch.setattr(s3_store._client, "stat_object", _fail("stat_object"))
    got = ads.get_state(s3_store, "a.safetensors", max_bytes=size, expected_sha256=sha)
    assert all(torch.equal(got[k], state[k]) for k in state)
    monkeypatch.setattr(object_store._S3Body, "readinto", _fail("readinto"))
    with pytest.raises(ads.InvalidAdapter, match=f"{size} bytes, over the limit of {size - 1}"):
        ads.get_state(s3_store, "a.safetensors", max_bytes=size - 1, expected_sha256=sha)


def test_adapter_sha_mismatch_is_detected(store: ObjectStore) -> None:
    small, big = minilm_lora_state(), synthetic_state(6 * MIB)
    for key, state in (("small.safetensors", small), ("big.safetensors", big)):
        sha = ads.put_state(store, key, state)
        with pytest.raises(ads.InvalidAdapter, match="sha256 does not match"):
            ads.get_state(store, key, max_bytes=64 * MIB, expected_sha256="0" * 64)
        # the same bytes, changed by one bit behind the store's back
        data = bytearray(store.get(key))
        data[-1] ^= 1
        store.put(key, bytes(data))
        with pytest.raises(ads.InvalidAdapter, match="sha256 does not match"):
            ads.get_state(store, key, max_bytes=64 * MIB, expected_sha256=sha)
    with pytest.raises(ObjectNotFound):
        ads.get_state(store, "missing.safetensors", max_bytes=MIB, expected_sha256="0" * 64)


def test_large_adapter_round_trip_streamed_multipart(store: ObjectStore) -> None:
    """Above 5 MiB: written from the tensors to a temp file, uploaded with put_file (S3:
    multipart), sha256 of the stored bytes, read back as views of one buffer."""
    state = synthetic_state(12 * MIB)
    state["extra.bias"] = torch.arange(7, dtype=torch.float64)  # stored as float32
    calls: list[str] = []
    for name in ("put", "put_file"):
        original = getattr(store, name)
        setattr(store, name, lambda *a, _n=name, _o=original: (calls.append(_n), _o(*a))[1])
    sha = ads.put_state(store, "big.safetensors", state, client_id="3")
    assert calls == ["put_file"]
    stored = store.get("big.safetensors")
    assert ads.sha256(stored) == sha
    assert stored == ads.encode(state, {"client_id": "3"})
    reference = st_load(stored)  # safetensors reads what fedvec wrote
    assert set(reference) == set(state)
    if isinstance(store, S3Store):
        etag = store._client.stat_object(store.bucket, "big.safetensors").etag or ""
        assert etag.strip('"').rpartition("-")[2].isdigit()  # "<md5>-<parts>"
    got = ads.get_state(store, "big.safetensors", max_bytes=len(stored), expected_sha256=sha)
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float())
        assert torch.equal(reference[k], got[k])
    with pytest.raises(ads.InvalidAdapter, match="over the limit"):
        ads.get_state(store, "big.safetensors", max_bytes=len(stored) - 1)


# --- the safetensors reader and writer ------------------------------------------------------


def test_encode_writes_what_safetensors_writes() -> None:
    states = [
        minilm_lora_state(),
        {"a": torch.ones(()), "b": torch.empty(0, 3), "é": torch.arange(5.0), "c": torch.ones(2)},
        {"t": torch.arange(12.0).reshape(3, 4).t()},  # not contiguous
    ]
    for state in states:
        for metadata in (None, {"client_id": "3"}):
            data = ads.encode(state, metadata)
            assert data == st_save({k: v.contiguous() for k, v in state.items()}, metadata)
            got = ads.decode(bytearray(data), max_bytes=len(data))
            assert set(got) == set(state)
            assert all(torch.equal(got[k], v) and got[k].shape == v.shape for k, v in state.items())


def test_decode_reads_every_dtype_safetensors_writes() -> None:
    state = {
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "f16": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(9),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 2, dtype=torch.int32),
    }
    data = st_save(state, {"format": "pt"})
    for given in (data, bytearray(data)):
        got = ads.decode(given, max_bytes=len(data))
        assert set(got) == set(state)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
    with pytest.raises(ads.InvalidAdapter, match="over the limit"):
        ads.decode(data, max_bytes=len(data) - 1)


def _file(header: object, body: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


_T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "data,why",
    [
        (b"\x01\x00", "too short"),
        ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
        (_file(None, raw=b"{not json"), "not JSON"),
        (_file(None, raw=b"\xff\xfe"), "not JSON"),
        (_file([1, 2]), "not a JSON object"),
        (_file({"__metadata__": {"a": 1}}), "__metadata__"),
        (_file({"t": {**_T, "dtype": "F31"}}, bytes(8)), "unknown dtype"),
        (_file({"t": {**_T, "dtype": ["F32"]}}, bytes(8)), "unknown dtype"),
        (_file({"t": {**_T, "shape": [-2]}}, bytes(8)), "bad shape"),
        (_file({"t": {**_T, "shape": [2.0]}}, bytes(8)), "bad shape"),
        (_file({"t": {**_T, "shape": [True, 2]}}, bytes(8)), "bad shape"),
        (_file({"t": {**_T, "data_offsets": [0]}}, bytes(8)), "bad data_offsets"),
        (_file({"t": {**_T, "data_offsets": [8, 0]}}, bytes(8)), "not right after"),
        (_file({"t": {"dtype": "F32", "shape": [2]}}, bytes(8)), "needs dtype"),
        (_file({"t": 3}, bytes(8)), "needs dtype"),
        (_file({"t": _T}, bytes(4)), "follow the header"),
        (_file({"t": _T}, bytes(12)), "follow the header"),
        (_file({"t": {**_T, "shape": [3]}}, bytes(8)), "8 bytes for shape"),
        (_file({"t": _T, "u": {**_T, "data_offsets": [4, 12]}}, bytes(12)), "not right after"),
        (_file({"t": _T, "u": {**_T, "data_offsets": [12, 20]}}, bytes(20)), "not right after"),
        (
            _file(
                None,
                bytes(8),
                raw=b'{"t":'
                + json.dumps(_T).encode()
                + b',"t":'
                + json.dumps({**_T, "data_offsets": [8, 16]}).encode()
                + b"}",
            ),
            "not right after",
        ),
    ],
)
def test_decode_refuses_malformed_files(data: bytes, why: str) -> None:
    with pytest.raises(ads.InvalidAdapter, match=why):
        ads.decode(data, max_bytes=1 << 20, what="upd")
    with pytest.raises(SafetensorError):  # safetensors refuses them too
        st_load(data)


def test_decode_ignores_unknown_tensor_fields_as_safetensors_does() -> None:
    data = _file({"t": {**_T, "extra": 1}}, struct.pack("<2f", 1.0, 2.0))
    assert ads.decode(data, max_bytes=len(data))["t"].tolist() == st_load(data)["t"].tolist()


def test_decode_copies_unaligned_tensors() -> None:
    """safetensors pads its header so tensors are aligned; a file that does not still
    decodes (that tensor copied), as safetensors' own reader allows."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((-len(header) % 8) + 1)  # one byte off
    data = len(header).to_bytes(8, "little") + header + struct.pack("<2f", 1.5, -2.0)
    got = ads.decode(bytearray(data), max_bytes=len(data))
    assert got["t"].tolist() == [1.5, -2.0]
    assert torch.equal(st_load(data)["t"], got["t"])
