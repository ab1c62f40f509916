"""What the benchmarks share: where the local services are, a scratch PostgreSQL database,
the commit a run came from, percentiles, a federation's latest adapters, and synthetic
adapters of a given shape or size."""

from __future__ import annotations

import math
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy import create_engine, func, select, text

from aggregator.task_vectors import StateDict
from schema.models import Client, PersonalizedAdapter, Update, UpdateStatus
from services import adapter_store as ads
from services.context import object_store
from services.db import get_engine, session_scope
from services.settings import Settings

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOCAL_REDIS = "redis://127.0.0.1:6379/14"
MIB = 2**20


def git_commit() -> str:
    """The commit the benchmark ran from, marked when tracked files were changed."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence: the smallest value
    with at least q % of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@contextmanager
def scratch_postgres(admin_url: str = LOCAL_POSTGRES) -> Iterator[str]:
    """A fresh PostgreSQL database on admin_url's server for one benchmark run (its url),
    dropped afterwards."""
    name = f"fedvec_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def latest_states(settings: Settings) -> tuple[dict[str, StateDict], dict[str, StateDict], dict]:
    """Per client name: its latest personalized adapter and its latest trained adapter
    (θ_k) with its example count."""
    store = object_store(settings)
    limit = settings.max_adapter_bytes
    personalized: dict[str, StateDict] = {}
    trained: dict[str, StateDict] = {}
    sizes: dict[str, int] = {}
    with session_scope(settings.resolved_database_url) as s:
        names = dict(s.execute(select(Client.id, Client.name)).tuples().all())
        newest = select(func.max(PersonalizedAdapter.id)).group_by(PersonalizedAdapter.client_id)
        for row in s.scalars(select(PersonalizedAdapter).where(PersonalizedAdapter.id.in_(newest))):
            personalized[names[row.client_id]] = ads.get_state(
                store, row.key, max_bytes=limit, expected_sha256=row.sha256
            )
        newest_u = (
            select(func.max(Update.id))
            .where(Update.status == UpdateStatus.AGGREGATED)
            .group_by(Update.client_id)
        )
        for u in s.scalars(select(Update).where(Update.id.in_(newest_u))):
            trained[names[u.client_id]] = ads.get_state(
                store, u.adapter_key, max_bytes=limit, expected_sha256=u.adapter_sha256
            )
            sizes[names[u.client_id]] = u.num_examples
    return personalized, trained, sizes


def minilm_lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Shaped like fedvec's MiniLM adapter: LoRA r=8 on query and value of 6 layers of
    width 384, and the one-score head (74,113 floats)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(8, 384, generator=gen)
            state[f"{prefix}.lora_B.weight"] = torch.randn(384, 8, generator=gen)
    state["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(
        1, 384, generator=gen
    )
    state["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(1)
    return state


def synthetic_state(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 LoRA-like tensors of 1 MiB each (r=64 x 4096) whose safetensors file is
    just under `nbytes` (room left for the header)."""
    gen = torch.Generator().manual_seed(seed)
    floats = (nbytes - 64 * 1024) // 4
    state: dict[str, torch.Tensor] = {}
    i = 0
    while floats > 0:
        rows = min(64, max(1, floats // 4096))
        n = rows * 4096 if floats >= 4096 else floats
        shape = (rows, 4096) if floats >= 4096 else (n,)
        kind = "A" if i % 2 == 0 else "B"
        state[f"layers.{i // 2:03d}.lora_{kind}.weight"] = torch.randn(*shape, generator=gen)
        floats -= n
        i += 1
    return state
