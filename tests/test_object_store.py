"""One behavioural suite run against both object-store backends (local folder, S3 via moto)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

import pytest

from services.object_store import (
    LocalFolderStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
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
