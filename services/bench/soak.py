"""`fedvec bench soak`: N clients push small synthetic updates through Redis + PostgreSQL + S3
at a fixed rate for a fixed time, to a real aggregator process. Nothing may be lost and
the aggregator's memory must stay flat.

This process acts as the workers, without training (so the rate is what we set): for each
update it writes the adapter and τ to the object store, commits a `stored` update row (as
the aggregator's intake records a verified report; signatures are checked there, and
tested in tests/test_aggregator_service.py) and sends `update.stored` on the `aggregate`
queue, in that order. Every client starts with one accepted update (bulk-inserted), so the
aggregator handles a population of N from the first event. A planted 2 % of the updates
are bad and must end `rejected`: a NaN in τ or a truncated τ file.

At the end it waits (bounded) for the queue to drain, then counts every sent update by its
final status: lost = sent − (aggregated + superseded + rejected + quarantined + failed),
which must be 0. The aggregator's RSS (/proc/<pid>/status VmRSS) is sampled every second;
the baseline is taken after a warm-up (the first max(10 s, 10 %) of the run: the index is
built, the connection pools and allocator arenas filled), and memory is flat when the RSS
at the end is less than FLAT_GROWTH (10 %) above that baseline.

Where the stack comes from: as `fedvec bench latency` (services/bench/latency.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from celery import Celery
from safetensors.torch import save as st_save
from sqlalchemy import func, insert, select

from aggregator.sketch import sketch_state_dict, to_bytes
from aggregator.task_vectors import norm
from schema.events import UpdateStored
from schema.models import (
    FINAL_STATUSES,
    Client,
    PersonalizedAdapter,
    ProcessedEvent,
    Update,
    UpdateStatus,
)
from services import adapter_store as ads
from services import processes
from services.bench.common import percentile
from services.bench.latency import local_stack
from services.bench.scale_service import SHAPES, PlantedVectors
from services.console import Echo
from services.context import object_store
from services.db import session_scope, upgrade
from services.object_store import ObjectStore
from services.settings import Settings
from services.signing import new_private_key, public_key

FINAL = FINAL_STATUSES
BAD_KINDS = ("nan", "corrupt")
FLAT_GROWTH = 0.10  # RSS growth after warm-up, as a fraction of the baseline, still "flat"
_INSERT_BATCH = 500
LOCAL_REDIS = "redis://127.0.0.1:6379/13"


@dataclass(frozen=True)
class SoakPlan:
    clients: int = 1000
    minutes: float = 10.0
    # 5 updates/s: at 1,000 clients the aggregator handles about 8-10/s on 2 shared cores,
    # so it is busy about half the time and a backlog drains
    rate: float = 5.0
    peers: int = 8  # FEDVEC_AGGREGATE_PEERS: per-update work does not grow with N
    bad_every: int = 50  # every 50th update is a planted bad one: 2 %
    seed: int = 0
    drain_timeout_s: float | None = None  # default: max(60 s, a quarter of the run)

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup_s(self) -> float:
        return max(10.0, 0.1 * self.duration_s)

    @property
    def drain_s(self) -> float:
        if self.drain_timeout_s is not None:
            return self.drain_timeout_s
        return max(60.0, 0.25 * self.duration_s)


QUICK = SoakPlan(clients=200, minutes=1.0)


def bad_kind(i: int, plan: SoakPlan) -> str | None:
    """The planted defect of the i-th timed update, if any (deterministic: the test checks
    each one ended `rejected`)."""
    if plan.bad_every <= 0 or i % plan.bad_every != plan.bad_every - 1:
        return None
    return BAD_KINDS[(i // plan.bad_every) % len(BAD_KINDS)]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


def memory_summary(
    samples: list[tuple[float, float]], warmup_s: float, end_mb: float | None
) -> dict[str, Any]:
    """Baseline after warm-up, end, growth, slope and the flat verdict of RSS samples
    (seconds since the timed run began, MB)."""
    after = [(t, y) for t, y in samples if t >= warmup_s] or samples[-1:]
    start = after[0][1] if after else None
    end = end_mb if end_mb is not None else (samples[-1][1] if samples else None)
    if start is None or end is None:
        return {"start_mb": start, "end_mb": end, "flat": False}
    growth = end - start
    return {
        "start_mb": round(start, 1),
        "end_mb": round(end, 1),
        "peak_mb": round(max(y for _, y in samples), 1),
        "growth_mb": round(growth, 1),
        "growth_pct": round(100 * growth / start, 2),
        "slope_mb_per_min": round(slope_per_minute(after), 3),
        "warmup_s": warmup_s,
        "samples": len(samples),
        "flat": growth < FLAT_GROWTH * start,
        # every 10 s, for a plot or a second look
        "timeline_mb": [[round(t), round(y, 1)] for t, y in samples[::10]],
    }


@dataclass
class _Population:
    ids: list[int]
    keys: dict[int, str]  # client id -> private key (what each client's site holds)
    tag: str  # `updates.worker` of this run's timed updates: counts ignore everything else


@dataclass
class _Progress:
    sent: int = 0
    event_ids: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # update uid -> planted defect
    send_errors: int = 0
    max_lag_s: float = 0.0
    error: BaseException | None = None
    done: bool = False


def _enroll(
    s: Settings, plan: SoakPlan, store: ObjectStore, vectors: PlantedVectors
) -> _Population:
    """N clients with key pairs and one accepted, signed update each (own τ object and
    sketch), bulk-inserted: the population the aggregator starts with."""
    run = uuid.uuid4().hex[:8]
    db = s.resolved_database_url
    private = {i: new_private_key() for i in range(plan.clients)}
    with session_scope(db) as ses:
        for a in range(0, plan.clients, _INSERT_BATCH):
            ses.execute(
                insert(Client),
                [
                    dict(
                        name=f"soak-{run}-{i}",
                        task=f"group-{i % len(vectors.directions)}",
                        data_path="/dev/null",  # no worker reads it: this process is the worker
                        num_examples=32,
                        public_key=public_key(private[i]),
                    )
                    for i in range(a, min(plan.clients, a + _INSERT_BATCH))
                ],
            )
        rows = ses.execute(
            select(Client.id, Client.name).where(Client.name.like(f"soak-{run}-%"))
        ).all()
    by_index = {int(name.rsplit("-", 1)[1]): cid for cid, name in rows}
    ids = [by_index[i] for i in range(plan.clients)]
    keys = {by_index[i]: private[i] for i in range(plan.clients)}
    seed_rows = []
    for i, cid in enumerate(ids):
        tau = vectors.tau(i)
        uid = str(uuid.uuid4())
        akey, tkey = ads.update_keys(cid, uid)
        # one object for both keys: θ = θ̄⁰ + τ = τ with the zero initial adapter
        sha = ads.put_state(store, akey, tau)
        seed_rows.append(
            dict(
                uid=uid,
                client_id=cid,
                base_version=0,
                status=UpdateStatus.AGGREGATED,
                adapter_key=akey,
                adapter_sha256=sha,
                task_vector_key=akey,
                task_vector_sha256=sha,
                task_vector_norm=norm(tau),
                sketch=to_bytes(sketch_state_dict(tau, s.sketch_dim, s.sketch_seed)),
                num_examples=32,
                worker=f"bench-soak-{run}-seed",
            )
        )
    for a in range(0, len(seed_rows), _INSERT_BATCH):
        with session_scope(db) as ses:
            ses.execute(insert(Update), seed_rows[a : a + _INSERT_BATCH])
    return _Population(ids, keys, tag=f"bench-soak-{run}")


def _store_update(
    s: Settings,
    store: ObjectStore,
    send: Callable[..., Any],
    pop: _Population,
    client_index: int,
    tau: dict[str, torch.Tensor],
    defect: str | None,
) -> tuple[str, str]:
    """A recorded update: objects, then the `stored` row, then the event.
    Returns (update uid, event id)."""
    from services.celery_app import AGGREGATE_TASK

    cid = pop.ids[client_index]
    uid = str(uuid.uuid4())
    akey, tkey = ads.update_keys(cid, uid)
    meta = {"client_id": str(cid), "update_uid": uid}
    if defect == "nan":
        tau = {k: v.clone() for k, v in tau.items()}
        next(iter(tau.values()))[0, 0] = float("nan")  # a diverged fine-tune
    # the sketch and norm as the worker makes them, from τ (NaN included)
    sketch = to_bytes(sketch_state_dict(tau, s.sketch_dim, s.sketch_seed))
    adapter_sha = ads.put_state(store, akey, tau, **meta)  # θ = τ: zero initial adapter
    if defect == "corrupt":
        # a truncated file, hashed and signed as written: only decoding can catch it
        data = st_save(tau)[:-100]
        store.put(tkey, data)
        tv_sha = ads.sha256(data)
    else:
        tv_sha = ads.put_state(store, tkey, tau, **meta)
    with session_scope(s.resolved_database_url) as ses:
        version = ses.scalar(
            select(func.max(PersonalizedAdapter.version)).where(
                PersonalizedAdapter.client_id == cid
            )
        )
        ses.add(
            Update(
                uid=uid,
                client_id=cid,
                base_version=version or 0,
                status=UpdateStatus.STORED,
                adapter_key=akey,
                adapter_sha256=adapter_sha,
                task_vector_key=tkey,
                task_vector_sha256=tv_sha,
                task_vector_norm=norm(tau),
                sketch=sketch,
                num_examples=32,
                steps=4,
                worker=pop.tag,
            )
        )
    event = UpdateStored(update_uid=uid, client_id=cid, round_id=None)
    send(AGGREGATE_TASK, args=[event.to_dict()])
    return uid, event.event_id


def _producer(
    s: Settings,
    plan: SoakPlan,
    pop: _Population,
    vectors: PlantedVectors,
    progress: _Progress,
    t0: float,
    total: int,
    stop: threading.Event,
) -> None:
    """Update i goes out at t0 + i / rate (a fixed schedule: a slow write is caught up,
    not skipped); clients take turns in a shuffled order."""
    from services.celery_app import make_app

    try:
        store = object_store(s)
        send = make_app(s).send_task
        order = list(range(len(pop.ids)))
        random.Random(plan.seed).shuffle(order)
        for i in range(total):
            if stop.is_set():
                return
            due = t0 + i / plan.rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                progress.max_lag_s = max(progress.max_lag_s, -wait)
            client_index = order[i % len(order)]
            defect = bad_kind(i, plan)
            tau = vectors.tau(client_index)
            try:
                uid, event_id = _store_update(s, store, send, pop, client_index, tau, defect)
            except Exception:  # noqa: BLE001 - counted; what was committed shows up as lost
                progress.send_errors += 1
                continue
            progress.event_ids.append(event_id)
            progress.uids.append(uid)
            if defect:
                progress.bad[uid] = defect
            progress.sent += 1
    except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
        progress.error = exc
    finally:
        progress.done = True


_HANDLED = re.compile(r"update\.stored client=\S+ update=\S+ -> (\S+) \((\d+\.\d+)s\)")


def handle_times(log: Path) -> list[float]:
    """Seconds per `update.stored` event, from the aggregator's own log lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [float(m.group(2)) for m in _HANDLED.finditer(text)]


def _status_counts(db: str, tag: str) -> dict[str, int]:
    with session_scope(db) as ses:
        rows = ses.execute(
            select(Update.status, func.count()).where(Update.worker == tag).group_by(Update.status)
        ).all()
    return {status: int(n) for status, n in rows}


def _handled(db: str, event_ids: list[str]) -> int:
    """How many of these events the aggregator has handled (processed_events)."""
    n = 0
    with session_scope(db) as ses:
        for a in range(0, len(event_ids), 1000):
            chunk = event_ids[a : a + 1000]
            query = select(func.count()).where(ProcessedEvent.event_id.in_(chunk))
            n += ses.scalar(query) or 0
    return n


def _final(counts: dict[str, int]) -> int:
    return sum(counts.get(x, 0) for x in FINAL)


@dataclass
class _Watch:
    """What the main thread keeps an eye on: the aggregator process, this run's counts, and
    the aggregator's RSS samples (seconds since the timed run began, MB)."""

    agg: subprocess.Popen[bytes]
    db: str
    tag: str
    logs: Path
    t0: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    exited: int | None = None

    def final(self) -> int:
        return _final(_status_counts(self.db, self.tag))

    def sample(self) -> float | None:
        mb = rss_mb(self.agg.pid)
        if mb is not None:
            self.samples.append((time.monotonic() - self.t0, mb))
        return mb

    def alive(self) -> bool:
        if self.exited is None and self.agg.poll() is not None:
            self.exited = self.agg.returncode
        return self.exited is None


def _probe(
    s: Settings, plan: SoakPlan, pop: _Population, vectors: PlantedVectors, watch: _Watch
) -> tuple[_Progress, float]:
    """One update, handled before the clock starts: the aggregator's index is built from
    the N seeded sketches and its Celery consumer is taking events. Returns (its progress,
    seconds until its event was handled)."""
    t = time.monotonic()
    warm = _Progress()
    probe = dataclasses.replace(plan, bad_every=0)
    _producer(s, probe, pop, vectors, warm, time.monotonic(), 1, threading.Event())
    if warm.error is not None:
        raise warm.error
    # the event, not the row: start-up recovery handles the row seconds before the
    # consumer is ready, and a clock started then begins with a backlog
    while not _handled(watch.db, warm.event_ids):
        if not watch.alive():
            raise RuntimeError(f"the aggregator exited ({watch.exited}); see {watch.logs}")
        if time.monotonic() - t > 180:
            raise RuntimeError(f"the aggregator handled no update in 180 s; see {watch.logs}")
        time.sleep(0.2)
    return warm, time.monotonic() - t


def _send_at_rate(
    s: Settings,
    plan: SoakPlan,
    pop: _Population,
    vectors: PlantedVectors,
    watch: _Watch,
    already: int,
    show: bool,
) -> tuple[_Progress, int]:
    """The timed run: a producer thread sends, this thread samples once a second. Returns
    (the producer's progress, the largest backlog seen)."""
    from tqdm import tqdm

    total = round(plan.rate * plan.duration_s)
    progress, stop = _Progress(), threading.Event()
    watch.t0 = time.monotonic()
    producer = threading.Thread(
        target=_producer,
        args=(s, plan, pop, vectors, progress, watch.t0, total, stop),
        name="soak-producer",
        daemon=True,
    )
    producer.start()
    backlog_max = 0
    bar = tqdm(total=total, desc="soak", unit="upd", disable=not show, leave=False)
    try:
        while not progress.done and watch.alive():
            time.sleep(1.0)
            mb = watch.sample()
            backlog = already + progress.sent - watch.final()
            backlog_max = max(backlog_max, backlog)
            bar.update(progress.sent - bar.n)
            bar.set_postfix_str(f"backlog {backlog}, aggregator {mb or 0:.0f} MB")
    finally:
        stop.set()
        producer.join()
        bar.close()
    if progress.error is not None:
        raise progress.error
    return progress, backlog_max


def _drain(
    sent: int, plan: SoakPlan, watch: _Watch, app: Celery, idle_s: float, show: bool
) -> None:
    """Wait until every update is final, the drain time is up, or nothing is queued and
    nothing moved for idle_s (what is left then will never come)."""
    from tqdm import tqdm

    from services.celery_app import AGGREGATE_QUEUE, queue_depths

    t = last_change = time.monotonic()
    last_done = -1
    with tqdm(total=sent, desc="drain", unit="upd", disable=not show, leave=False) as bar:
        while watch.alive():
            done = watch.final()
            bar.update(done - bar.n)
            watch.sample()
            now = time.monotonic()
            if done >= sent or now - t > plan.drain_s:
                return
            if done != last_done:
                last_change, last_done = now, done
            elif now - last_change > idle_s:
                if queue_depths(app, [AGGREGATE_QUEUE]).get(AGGREGATE_QUEUE) == 0:
                    return
            time.sleep(0.5)


def run_soak(
    settings: Settings, plan: SoakPlan, *, out_dir: Path, echo: Echo, show: bool = True
) -> dict[str, Any]:
    from services.celery_app import make_app

    # moto's S3 server runs in this process: one log line per request otherwise
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    settings = settings.replace(home=str(out_dir), aggregate_peers=plan.peers)
    if not settings.broker_url:
        # not bench latency's Redis database (local_stack's): one run would flush the other's
        # queue, and a flushed event reads as lost here
        import redis

        redis.Redis.from_url(LOCAL_REDIS).flushdb()
        settings = settings.replace(broker_url=LOCAL_REDIS)
    with local_stack(settings, echo) as s:
        db = s.resolved_database_url
        upgrade(db)
        store = object_store(s)
        zeros = {k: torch.zeros(v) for k, v in SHAPES.items()}
        ads.put_state(store, ads.INITIAL_ADAPTER_KEY, zeros)
        vectors = PlantedVectors(plan.clients, plan.seed)
        t = time.monotonic()
        pop = _enroll(s, plan, store, vectors)
        setup_s = time.monotonic() - t
        echo(
            f"{plan.clients} clients enrolled with secrets and one accepted update each "
            f"({setup_s:.1f}s); FEDVEC_AGGREGATE_PEERS={plan.peers}, sketch k={s.sketch_dim}, "
            f"τ of {sum(math.prod(x) for x in SHAPES.values())} parameters"
        )
        logs = out_dir / "logs"
        with processes.service(s, logs, workers=0) as procs:
            watch = _Watch(procs[0], db, pop.tag, logs)
            warm, first_s = _probe(s, plan, pop, vectors, watch)
            echo(f"aggregator pid {watch.agg.pid}: first event handled {first_s:.1f}s after start")
            progress, backlog_max = _send_at_rate(s, plan, pop, vectors, watch, warm.sent, show)
            send_s = time.monotonic() - watch.t0
            sent = warm.sent + progress.sent
            backlog_at_end = sent - watch.final()
            t = time.monotonic()
            # an aggregator that re-handles stored updates every FEDVEC_RECOVER_INTERVAL
            # (where that setting exists) gets one round of it before anything counts as lost
            idle_s = 10 + max(0.0, float(getattr(s, "recover_interval", 0.0)))
            _drain(sent, plan, watch, make_app(s), idle_s, show)
            drain_s = time.monotonic() - t
            end_mb = watch.sample() if watch.alive() else None
        # the aggregator has stopped: these counts are final
        result = _summarize(
            s,
            plan,
            pop,
            progress,
            warm,
            _status_counts(db, pop.tag),
            watch.samples,
            end_mb,
            send_s=send_s,
            drain_s=drain_s,
            first_s=first_s,
            setup_s=setup_s,
            backlog_max=backlog_max,
            backlog_at_end=backlog_at_end,
            exited=watch.exited,
        )
        result["logs"] = str(logs)
        busy = handle_times(logs / "aggregator.log")
        if busy:
            # the aggregator's own time per event: how much of each second it is busy, and
            # the rate it could take (a rate near it leaves no margin)
            mean = statistics.fmean(busy)
            result["handle_s"] = {
                "p50": round(percentile(busy, 50), 4),
                "p95": round(percentile(busy, 95), 4),
                "mean": round(mean, 4),
                "capacity_updates_per_s": round(1 / mean, 1),
                "busy_fraction": round(plan.rate * mean, 3),
            }
    _print(result, echo)
    return result


def _summarize(
    s: Settings,
    plan: SoakPlan,
    pop: _Population,
    progress: _Progress,
    warm: _Progress,
    counts: dict[str, int],
    samples: list[tuple[float, float]],
    end_mb: float | None,
    **timing: Any,
) -> dict[str, Any]:
    db = s.resolved_database_url
    sent = warm.sent + progress.sent
    final = _final(counts)
    event_ids = warm.event_ids + progress.event_ids
    with session_scope(db) as ses:
        rows = ses.execute(
            select(Update.created_at, PersonalizedAdapter.created_at)
            .join(PersonalizedAdapter, PersonalizedAdapter.trigger_update_id == Update.id)
            .where(Update.worker == pop.tag)
        ).all()
        bad_status = dict(
            ses.execute(select(Update.uid, Update.status).where(Update.uid.in_(list(progress.bad))))
            .tuples()
            .all()
        )
        # the timed run's updates only (not the probe, sent before the clock started)
        first_stored, last_done, timed_aggregated = ses.execute(
            select(
                func.min(Update.created_at),
                func.max(Update.aggregated_at),
                func.count(Update.aggregated_at),
            ).where(Update.worker == pop.tag, Update.uid.not_in(warm.uids))
        ).one()
    latencies = [(pub - stored).total_seconds() for stored, pub in rows]
    planted: dict[str, dict[str, int]] = {}
    for uid, kind in progress.bad.items():
        entry = planted.setdefault(kind, {"planted": 0, "rejected": 0})
        entry["planted"] += 1
        entry["rejected"] += bad_status.get(uid) == UpdateStatus.REJECTED
    span = (last_done - first_stored).total_seconds() if first_stored and last_done else None
    return {
        "clients": plan.clients,
        "minutes": plan.minutes,
        "rate": plan.rate,
        "peers": plan.peers,
        "sketch_dim": s.sketch_dim,
        "updates_in": sent,
        "aggregated": counts.get("aggregated", 0),
        "rejected": counts.get("rejected", 0),
        "quarantined": counts.get("quarantined", 0),
        "superseded": counts.get("superseded", 0),
        "failed": counts.get("failed", 0),
        "pending": counts.get("stored", 0),
        "lost": sent - final,
        "events_handled": _handled(db, event_ids),
        "send_errors": progress.send_errors,
        "planted_bad": planted,
        "planted_bad_rejected": all(v == UpdateStatus.REJECTED for v in bad_status.values())
        and len(bad_status) == len(progress.bad),
        "offered_updates_per_s": round(progress.sent / timing["send_s"], 2),
        "aggregated_per_s": round(timed_aggregated / span, 2) if span else None,
        "stored_to_personalized_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "max": round(max(latencies), 3),
        }
        if latencies
        else None,
        "backlog_max": timing["backlog_max"],
        "backlog_at_end_of_sending": timing["backlog_at_end"],
        "producer_max_lag_s": round(progress.max_lag_s, 2),
        "memory": memory_summary(samples, plan.warmup_s, end_mb),
        "aggregator_exit": timing["exited"],
        "seconds": {
            "setup": round(timing["setup_s"], 1),
            "first_update": round(timing["first_s"], 1),
            "sending": round(timing["send_s"], 1),
            "drain": round(timing["drain_s"], 1),
        },
    }


def _print(r: dict[str, Any], echo: Echo) -> None:
    mem = r["memory"]
    lat = r["stored_to_personalized_s"] or {"p50": float("nan"), "p95": float("nan"), "max": 0}
    bad = ", ".join(f"{k} {v['rejected']}/{v['planted']}" for k, v in r["planted_bad"].items())
    missing = r["updates_in"] - r["events_handled"]
    raised = f" ({missing} raised in the aggregator: see its log)" if missing else ""
    echo(
        f"\nsoak: {r['clients']} clients, {r['minutes']:g} min at {r['rate']:g} updates/s "
        f"(offered {r['offered_updates_per_s']}/s), FEDVEC_AGGREGATE_PEERS={r['peers']}\n"
        f"  updates in    {r['updates_in']}\n"
        f"  aggregated    {r['aggregated']}\n"
        f"  rejected      {r['rejected']}  (planted bad ones rejected: {bad or 'none planted'})\n"
        f"  quarantined   {r['quarantined']}\n"
        f"  superseded    {r['superseded']}  (a newer update of the client aggregated first)\n"
        f"  failed        {r['failed']}\n"
        f"  still pending {r['pending']}\n"
        f"  lost          {r['lost']}  (sent − every final status; must be 0)\n"
        f"  events handled {r['events_handled']} of {r['updates_in']}"
        f"{raised}, send errors {r['send_errors']}, backlog max "
        f"{r['backlog_max']} (at the end of sending {r['backlog_at_end_of_sending']}), drain "
        f"{r['seconds']['drain']}s\n"
        f"  throughput    {r['aggregated_per_s']} aggregated/s; update.stored -> personalized "
        f"p50 {lat['p50']:.3f}s p95 {lat['p95']:.3f}s max {lat['max']:.3f}s"
    )
    if h := r.get("handle_s"):
        echo(
            f"  aggregator per event p50 {h['p50'] * 1e3:.1f} ms, p95 {h['p95'] * 1e3:.1f} ms: "
            f"busy {h['busy_fraction']:.0%} of the time at {r['rate']:g}/s, capacity about "
            f"{h['capacity_updates_per_s']:g} updates/s"
        )
    if mem.get("start_mb") is not None and "growth_mb" in mem:
        echo(
            f"  aggregator RSS after {mem['warmup_s']:g}s warm-up {mem['start_mb']:.1f} MB, "
            f"end {mem['end_mb']:.1f} MB, peak {mem['peak_mb']:.1f} MB: "
            f"{mem['growth_mb']:+.1f} MB ({mem['growth_pct']:+.1f} %), slope "
            f"{mem['slope_mb_per_min']:+.2f} MB/min -> "
            f"{'flat' if mem['flat'] else 'NOT flat'} (flat: < {FLAT_GROWTH:.0%} growth)"
        )
    else:
        echo("  aggregator RSS: no samples (the process was gone)")
    if r["aggregator_exit"] is not None:
        echo(f"  the aggregator exited early with code {r['aggregator_exit']}: see {r['logs']}")
    verdict = "OK: nothing lost" if r["lost"] == 0 else f"LOST {r['lost']} UPDATES"
    if missing:
        verdict += f"; {missing} events raised in the aggregator"
        if r["lost"] == 0:
            verdict += " (their updates were finished later, from the database)"
    echo(f"  verdict: {verdict}")
