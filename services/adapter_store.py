"""Adapters and task vectors in the object store: where they live, how they are written
(safetensors, sha256) and how received bytes are read (safetensors only, never pickle,
size-limited, checksum-verified)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aggregator.task_vectors import StateDict
from services.object_store import ObjectStore, ObjectTooLarge

INITIAL_ADAPTER_KEY = "global/initial_adapter.safetensors"
ADAPTER_CONFIG_KEY = "global/adapter_config.json"
# Larger states go to the store from a temporary file, part by part (S3 multipart starts at
# 5 MiB), so their serialized bytes are never in memory whole beside their tensors.
STREAM_ABOVE_BYTES = 5 * 2**20

# safetensors' dtype names (those this torch has); `decode` accepts any of them
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in (
        ("F64", torch.float64),
        ("F32", torch.float32),
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
        ("I64", torch.int64),
        ("I32", torch.int32),
        ("I16", torch.int16),
        ("I8", torch.int8),
        ("U8", torch.uint8),
        ("BOOL", torch.bool),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("U16", getattr(torch, "uint16", None)),
        ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)),
    )
    if dtype is not None
}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_LITTLE_ENDIAN = sys.byteorder == "little"
# Bytes hashed in the caller's thread; past them the hashing moves to a thread of its own
# and overlaps the transfer (hashlib lets go of the GIL while it hashes).
_HASH_INLINE_BYTES = 2 * 2**20


class InvalidAdapter(ValueError):
    """Bytes that are not an acceptable adapter: the message says why."""


def update_prefix(client_id: int, update_uid: str) -> str:
    return f"clients/{client_id}/updates/{update_uid}/"


def update_keys(client_id: int, update_uid: str) -> tuple[str, str]:
    """(adapter key, task vector key) of an update."""
    prefix = update_prefix(client_id, update_uid)
    return prefix + "adapter.safetensors", prefix + "task_vector.safetensors"


def sketch_key(client_id: int, update_uid: str) -> str:
    """The count sketch of an update's τ (aggregator/sketch.py), when sketches are on."""
    return update_prefix(client_id, update_uid) + "sketch.bin"


def report_key(client_id: int, update_uid: str) -> str:
    """The worker's signed report of an update (schema/events.UpdateReported), written after
    every other object of the update: once it exists the update is complete and never
    rewritten, and a redelivered request sends it again instead of training again."""
    return update_prefix(client_id, update_uid) + "report.json"


def personalized_key(client_id: int, version: int) -> str:
    return f"clients/{client_id}/personalized/{version:06d}.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Sha256:
    """sha256 of the pieces given to `update`, in order. Small inputs are hashed at once;
    past _HASH_INLINE_BYTES the rest goes to a hashing thread, so the pieces must stay
    unchanged until `hexdigest` (or `close`, which stops the thread) returns."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._inline = 0
        self._queue: queue.SimpleQueue[memoryview | bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, piece: memoryview | bytes) -> None:
        if self._queue is None:
            if self._inline + len(piece) <= _HASH_INLINE_BYTES:
                self._hash.update(piece)
                self._inline += len(piece)
                return
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="fedvec-sha256", daemon=True)
            self._thread.start()
        self._queue.put(piece)

    def _run(self) -> None:
        assert self._queue is not None
        while (piece := self._queue.get()) is not None:
            self._hash.update(piece)

    def close(self) -> None:
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


def _cpu_float32(state: StateDict) -> StateDict:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(state.items())}


def _layout(tensors: StateDict, metadata: dict[str, str] | None) -> list[memoryview | bytes]:
    """A safetensors file as pieces: its header, then each tensor's own memory (no copy).
    Laid out as safetensors.torch.save lays them (all float32, so sorted by name)."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    pieces: list[memoryview | bytes] = [b""]
    offset = 0
    for name, tensor in tensors.items():  # _cpu_float32 sorted them
        nbytes = tensor.numel() * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        # the tensor's own memory as bytes (float32 on a little-endian machine, as stored)
        pieces.append(memoryview(tensor.numpy()).cast("B") if nbytes else b"")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    pieces[0] = len(text).to_bytes(8, "little") + text
    return pieces


def encode(state: StateDict, metadata: dict[str, str] | None = None) -> bytes:
    return _encode(_cpu_float32(state), metadata)


def _encode(tensors: StateDict, metadata: dict[str, str] | None) -> bytes:
    if not _LITTLE_ENDIAN:  # safetensors stores little-endian: let it swap the bytes
        return st_save(tensors, metadata=metadata)
    return b"".join(_layout(tensors, metadata))


def decode(
    data: bytes | bytearray | memoryview, *, max_bytes: int, what: str = "adapter"
) -> StateDict:
    """The tensors of a safetensors file. From a writable buffer (a bytearray, or the view
    ObjectStore.get_bounded returns) they are views of it, no copy; read-only bytes are
    copied once first."""
    view = memoryview(data)
    if view.nbytes > max_bytes:
        raise InvalidAdapter(f"{what} is {view.nbytes} bytes, over the limit of {max_bytes}")
    if view.readonly or not view.c_contiguous:
        view = memoryview(bytearray(view))
    return _tensors(view.cast("B"), what)


def _invalid(what: str, why: str) -> InvalidAdapter:
    return InvalidAdapter(f"{what} is not a valid safetensors file: {why}")


def _counts(values: Any, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `length` items, when given)."""
    return (
        type(values) is list
        and (length is None or len(values) == length)
        and all(type(v) is int and v >= 0 for v in values)
    )


_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def _tensors(buf: memoryview, what: str) -> StateDict:
    """Parse and check a safetensors file as safetensors does (header length and JSON,
    known dtypes, every tensor's size matching its shape, the tensors packed one after the
    other with nothing left over), then give the tensors as views of `buf` (writable,
    1-D bytes), which they keep alive."""
    size = len(buf)
    if size < 8:
        raise _invalid(what, f"{size} bytes, too short for the header length")
    n = int.from_bytes(buf[:8], "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise _invalid(what, f"header length {n} does not fit in its {size} bytes")
    try:
        # a name given twice leaves a gap where its first entry was: refused below
        header = json.loads(bytes(buf[8 : 8 + n]).decode())
        # refused by safetensors' JSON parser but read by Python's: NaN, Infinity, numbers
        # out of range (read as inf), lone surrogates (not UTF-8)
        json.dumps(header, ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(what, f"header is not JSON: {exc}") from None
    if type(header) is not dict:
        raise _invalid(what, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        type(metadata) is dict and all(type(v) is str for v in metadata.values())
    ):
        raise _invalid(what, "__metadata__ must map str to str")
    entries: list[tuple[int, int, str, torch.dtype, list[int]]] = []
    for name, info in header.items():
        if type(info) is not dict or not _FIELDS <= info.keys():  # others ignored, as there
            raise _invalid(what, f"tensor {name!r}: needs dtype, shape and data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise _invalid(what, f"tensor {name!r}: unknown dtype {dtype_name!r}")
        if not _counts(shape):
            raise _invalid(what, f"tensor {name!r}: bad shape {shape!r}")
        if not _counts(offsets, 2):
            raise _invalid(what, f"tensor {name!r}: bad data_offsets {offsets!r}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    start, end = 8 + n, 0
    for begin, stop, name, dtype, shape in entries:
        if begin != end or stop < begin:
            raise _invalid(what, f"tensor {name!r} at {begin}..{stop}: not right after {end}")
        if math.prod(shape) * dtype.itemsize != stop - begin:
            raise _invalid(what, f"tensor {name!r}: {stop - begin} bytes for shape {shape}")
        end = stop
    if start + end != size:
        raise _invalid(what, f"the tensors take {end} bytes but {size - start} follow the header")
    if not _LITTLE_ENDIAN:  # pragma: no cover - safetensors swaps the bytes (a copy)
        return dict(st_load(bytes(buf)))
    out: StateDict = {}
    for begin, stop, name, dtype, shape in entries:
        count = (stop - begin) // dtype.itemsize
        if count == 0:
            try:  # torch refuses a dimension or a size past int64 (in safetensors.torch too)
                out[name] = torch.empty(shape, dtype=dtype)
            except (RuntimeError, TypeError, OverflowError):
                raise _invalid(what, f"tensor {name!r}: shape {shape} too large") from None
            continue
        tensor = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin)
        if (start + begin) % dtype.itemsize:  # safetensors aligns them, others may not
            tensor = tensor.clone()
        out[name] = tensor.view(shape)
    return out


def put_state(store: ObjectStore, key: str, state: StateDict, **metadata: str) -> str:
    """Write a state dict (as `encode` does); returns the sha256 of the stored bytes.
    Above STREAM_ABOVE_BYTES the file is written straight from the tensors' memory to a
    temporary file, hashed on the way, and uploaded from it part by part."""
    tensors = _cpu_float32(state)
    if sum(t.nbytes for t in tensors.values()) <= STREAM_ABOVE_BYTES or not _LITTLE_ENDIAN:
        data = _encode(tensors, metadata or None)
        store.put(key, data)
        return sha256(data)
    digest = _Sha256()  # hashes the pieces while they are written and uploaded
    try:
        with tempfile.TemporaryDirectory(prefix="fedvec-state-") as tmp:
            path = Path(tmp) / "state.safetensors"
            with open(path, "wb", buffering=0) as f:
                for piece in _layout(tensors, metadata or None):
                    digest.update(piece)
                    _write_all(f.fileno(), piece)
            store.put_file(key, path)
        return digest.hexdigest()
    finally:
        digest.close()


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def get_state(
    store: ObjectStore, key: str, *, max_bytes: int, expected_sha256: str | None = None
) -> StateDict:
    """Read, check and decode a state in one pass over its bytes: the size limit is applied
    to the size the store declares before anything is read (and while reading where it
    declares none), the sha256 is computed as the bytes arrive, and the tensors are views
    of the one buffer they arrived in."""
    # Hashed as the chunks arrive, in this thread: the server keeps sending meanwhile (a
    # hashing thread measured no faster on two cores, where it competes with the server).
    digest = hashlib.sha256() if expected_sha256 is not None else None
    try:
        data = store.get_bounded(key, max_bytes, digest.update if digest is not None else None)
    except ObjectTooLarge as exc:
        size = f"{exc.size} bytes" if exc.size is not None else f"more than {max_bytes} bytes"
        raise InvalidAdapter(f"{key} is {size}, over the limit of {max_bytes}") from None
    if digest is not None and digest.hexdigest() != expected_sha256:
        raise InvalidAdapter(f"{key}: sha256 does not match the recorded one")
    return _tensors(data, key)


def write_peft_folder(out_dir: Path, state: StateDict, adapter_config: dict[str, Any]) -> Path:
    """A folder `PeftModel.from_pretrained(base, out_dir)` loads: adapter_config.json and
    adapter_model.safetensors with the keys peft saves (no adapter name in them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (out_dir / "adapter_model.safetensors").write_bytes(encode(state, {"format": "pt"}))
    return out_dir
