"""The service part of `fedvec bench scale`: what `Aggregator.handle` costs per update event
at N enrolled clients with FEDVEC_AGGREGATE_PEERS = m, on a real database.

The cells of `services/bench/scale.py` time the math at real sizes d; this part times
everything around it: reading the N latest update ids, bringing the sketch index up to date,
the similarity row over N sketches of the real size k, regrouping, loading the client's and
its peers' vectors, writing edges, groups and the personalized adapter's row and object.
Task vectors are small here (a few hundred parameters), so the object-store transfer and
the exact step are negligible and what is left is the service's own cost.

N clients and their accepted updates are bulk-inserted first (the sketches as a worker
writes them, one shared pair of objects), then `events` new updates arrive one at a time
as a worker would store them, each handled through `Aggregator.handle`. The first event
builds the index from the database (start-up) and is reported apart.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import insert

from aggregator.service import Aggregator
from aggregator.sketch import sketch_state_dict, to_bytes
from schema.events import UpdateStored
from schema.models import Client, Update, UpdateStatus
from services import adapter_store as ads
from services.bench.common import percentile, scratch_postgres
from services.console import Echo
from services.context import object_store
from services.db import redact_url, session_scope, upgrade
from services.settings import Settings

SHAPES = {
    "base_model.model.layer.0.query.lora_A.weight": (8, 32),
    "base_model.model.layer.0.query.lora_B.weight": (32, 8),
}
GROUP_SIZE = 50  # planted clients per group, as in the math cells
_INSERT_BATCH = 1000


class PlantedVectors:
    """Planted task vectors: a shared direction per group plus a client's own noise."""

    def __init__(self, n: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.directions = [self._random() for _ in range(max(1, n // GROUP_SIZE))]

    def _random(self) -> dict[str, torch.Tensor]:
        return {k: torch.randn(shape, generator=self.g) for k, shape in SHAPES.items()}

    def tau(self, client: int) -> dict[str, torch.Tensor]:
        base, noise = self.directions[client % len(self.directions)], self._random()
        return {k: base[k] + 0.3 * noise[k] for k in SHAPES}


@contextmanager
def _database(kind: str, home: Path) -> Iterator[str]:
    if kind == "postgres":
        with scratch_postgres() as url:
            yield url
    else:
        yield f"sqlite:///{home / 'fedvec.db'}"


def run_service_cell(
    settings: Settings, n: int, *, k: int, peers: int, database: str, events: int, seed: int = 0
) -> dict[str, Any]:
    """Per-event cost of Aggregator.handle at n clients (see the module docstring)."""
    logging.getLogger("aggregator").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedvec-bench-scale-") as tmp:
        home = Path(tmp)
        with _database(database, home) as url:
            s = settings.replace(
                home=str(home),
                database_url=url,
                object_store_url="",
                strategy="fedbip",
                group_threshold=0.3,
                sketch_dim=k,
                aggregate_peers=peers,
            )
            return _run(s, n, events, seed)


def _run(s: Settings, n: int, events: int, seed: int) -> dict[str, Any]:
    db = s.resolved_database_url
    upgrade(db)
    store = object_store(s)
    vectors = PlantedVectors(n, seed)
    initial = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    ads.put_state(store, ads.INITIAL_ADAPTER_KEY, initial)
    t0 = time.perf_counter()
    shared = vectors.tau(0)
    a_sha = ads.put_state(store, "bench/adapter", shared)
    t_sha = ads.put_state(store, "bench/task-vector", shared)
    with session_scope(db) as ses:
        ses.execute(
            insert(Client),
            [
                dict(id=i + 1, name=f"c{i}", task="t", data_path="/dev/null", num_examples=10)
                for i in range(n)
            ],
        )
    for a in range(0, n, _INSERT_BATCH):
        rows = [
            dict(
                uid=str(uuid.uuid4()),
                client_id=i + 1,
                base_version=0,
                status=UpdateStatus.AGGREGATED,
                adapter_key="bench/adapter",
                adapter_sha256=a_sha,
                task_vector_key="bench/task-vector",
                task_vector_sha256=t_sha,
                num_examples=10,
                sketch=to_bytes(sketch_state_dict(vectors.tau(i), s.sketch_dim, s.sketch_seed)),
            )
            for i in range(a, min(n, a + _INSERT_BATCH))
        ]
        with session_scope(db) as ses:
            ses.execute(insert(Update), rows)
    setup_s = time.perf_counter() - t0

    aggregator = Aggregator(s)
    times: list[float] = []
    for e in range(events + 1):
        client = (e * 7919) % n
        tau = vectors.tau(client)
        uid = str(uuid.uuid4())
        akey, tkey = ads.update_keys(client + 1, uid)
        with session_scope(db) as ses:
            ses.add(
                Update(
                    uid=uid,
                    client_id=client + 1,
                    base_version=0,
                    status=UpdateStatus.STORED,
                    adapter_key=akey,
                    adapter_sha256=ads.put_state(store, akey, tau),
                    task_vector_key=tkey,
                    task_vector_sha256=ads.put_state(store, tkey, tau),
                    num_examples=10,
                    sketch=to_bytes(sketch_state_dict(tau, s.sketch_dim, s.sketch_seed)),
                )
            )
        t = time.perf_counter()
        outcome = aggregator.handle(UpdateStored(uid, client + 1, None).to_dict())
        times.append(time.perf_counter() - t)
        if outcome != UpdateStatus.AGGREGATED:
            raise RuntimeError(f"bench scale --service: update {uid} was {outcome}")
    steady = times[1:]
    return {
        "clients": n,
        "database": redact_url(db).split("://")[0],
        "setup_s": setup_s,
        "startup_ms": 1e3 * times[0],
        "latency_ms": {
            "p50": 1e3 * percentile(steady, 50),
            "p95": 1e3 * percentile(steady, 95),
            "max": 1e3 * max(steady),
            "events": len(steady),
        },
    }


def run_service_bench(
    settings: Settings,
    clients: tuple[int, ...],
    *,
    k: int,
    peers: int,
    database: str,
    events: int,
    echo: Echo,
) -> list[dict[str, Any]]:
    echo(
        f"\nservice: Aggregator.handle per update event on {database}, "
        f"FEDVEC_AGGREGATE_PEERS={peers}, sketch k={k:,}, small task vectors (the math at "
        f"real d is above); {events} events per N after the first"
    )
    cells = []
    for n in clients:
        cell = run_service_cell(settings, n, k=k, peers=peers, database=database, events=events)
        cells.append(cell)
        lat = cell["latency_ms"]
        echo(
            f"  N={n:>7,}: per update p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, "
            f"max {lat['max']:.1f} ms; first event (index built from the database) "
            f"{cell['startup_ms']:,.0f} ms; setup {cell['setup_s']:.1f} s"
        )
    return cells
