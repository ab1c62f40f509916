"""Adapters and task vectors in the object store: where they live, how they are written
(safetensors, sha256) and how received bytes are read (safetensors only, never pickle,
size-limited, checksum-verified)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from aggregator.task_vectors import StateDict
from services.object_store import ObjectStore

INITIAL_ADAPTER_KEY = "global/initial_adapter.safetensors"
ADAPTER_CONFIG_KEY = "global/adapter_config.json"
# Larger states go to the store from a temporary file, part by part (S3 multipart starts at
# 5 MiB), so their serialized bytes are never in memory whole beside their tensors.
STREAM_ABOVE_BYTES = 5 * 2**20


class InvalidAdapter(ValueError):
    """Bytes that are not an acceptable adapter: the message says why."""


def update_prefix(client_id: int, update_uid: str) -> str:
    return f"clients/{client_id}/updates/{update_uid}/"


def update_keys(client_id: int, update_uid: str) -> tuple[str, str]:
    """(adapter key, task vector key) of an update."""
    prefix = update_prefix(client_id, update_uid)
    return prefix + "adapter.safetensors", prefix + "task_vector.safetensors"


def personalized_key(client_id: int, version: int) -> str:
    return f"clients/{client_id}/personalized/{version:06d}.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cpu_float32(state: StateDict) -> StateDict:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(state.items())}


def encode(state: StateDict, metadata: dict[str, str] | None = None) -> bytes:
    return st_save(_cpu_float32(state), metadata=metadata)


def decode(data: bytes, *, max_bytes: int, what: str = "adapter") -> StateDict:
    if len(data) > max_bytes:
        raise InvalidAdapter(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(f"{what} is not a valid safetensors file: {exc}") from None


def put_state(store: ObjectStore, key: str, state: StateDict, **metadata: str) -> str:
    """Write a state dict (as `encode` does); returns the sha256 of the stored bytes."""
    tensors = _cpu_float32(state)
    if sum(t.nbytes for t in tensors.values()) <= STREAM_ABOVE_BYTES:
        data = st_save(tensors, metadata=metadata or None)
        store.put(key, data)
        return sha256(data)
    with tempfile.TemporaryDirectory(prefix="fedvec-state-") as tmp:
        path = Path(tmp) / "state.safetensors"
        st_save_file(tensors, path, metadata=metadata or None)  # written from the tensors
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        store.put_file(key, path)
    return digest


def get_state(
    store: ObjectStore, key: str, *, max_bytes: int, expected_sha256: str | None = None
) -> StateDict:
    size = store.size(key)
    if size > max_bytes:  # refuse before downloading
        raise InvalidAdapter(f"{key} is {size} bytes, over the limit of {max_bytes}")
    data = store.get(key)
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise InvalidAdapter(f"{key}: sha256 does not match the recorded one")
    return decode(data, max_bytes=max_bytes, what=key)


def write_peft_folder(out_dir: Path, state: StateDict, adapter_config: dict[str, Any]) -> Path:
    """A folder `PeftModel.from_pretrained(base, out_dir)` loads: adapter_config.json and
    adapter_model.safetensors with the keys peft saves (no adapter name in them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (out_dir / "adapter_model.safetensors").write_bytes(encode(state, {"format": "pt"}))
    return out_dir
