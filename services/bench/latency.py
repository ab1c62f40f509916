"""`fedvec bench latency`: how long after an update is stored does its client's new
personalized adapter become available, on the distributed stack (Redis, PostgreSQL, S3)?

Real processes: N workers and one aggregator are started as children, clients are
enrolled, and asynchronous training requests are sent all at once, so the aggregator
sees updates arrive while it works. For every update the latency is
`personalized_adapters.created_at - updates.created_at` (the update's row is written just
before its `update.stored` event is sent; the adapter's row is committed with it).

Where the deployment comes from: FEDVEC_DATABASE_URL / FEDVEC_BROKER_URL /
FEDVEC_S3_ENDPOINT when they are set; otherwise this machine's PostgreSQL and Redis on
their default ports (a fresh database, a spare Redis database) and moto's S3 server on
loopback (installed with the test extra).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from schema.models import PersonalizedAdapter, Update, UpdateStatus
from services import operations as ops
from services import processes
from services.bench.common import LOCAL_REDIS, percentile, scratch_postgres
from services.console import Echo
from services.db import session_scope, upgrade
from services.demo_data import build_demo_clients
from services.settings import Settings


@contextmanager
def local_stack(settings: Settings, echo: Echo) -> Iterator[Settings]:
    """Fill in whatever part of the distributed stack the settings leave embedded."""
    with ExitStack() as stack:
        if not settings.database_url:
            settings = settings.replace(database_url=stack.enter_context(scratch_postgres()))
        if not settings.broker_url:
            import redis

            redis.Redis.from_url(LOCAL_REDIS).flushdb()
            settings = settings.replace(broker_url=LOCAL_REDIS)
        if not settings.s3_endpoint:
            from services.s3_server import start_s3_server

            endpoint, stop = start_s3_server()
            stack.callback(stop)
            settings = settings.replace(
                s3_endpoint=endpoint, s3_access_key="bench", s3_secret_key="bench"
            )
        if not settings.object_store_url.startswith("s3://"):
            settings = settings.replace(
                object_store_url=f"s3://fedvec-bench-{uuid.uuid4().hex[:8]}"
            )
        echo(
            f"stack: {settings.database_url.split('@')[-1]}, {settings.broker_url}, "
            f"S3 at {settings.s3_endpoint}"
        )
        yield settings


# what an update ends as here (no poisoned updates are sent)
DONE = (UpdateStatus.AGGREGATED, UpdateStatus.REJECTED, UpdateStatus.FAILED)


def run_latency_bench(
    settings: Settings,
    *,
    updates: int,
    clients: int,
    workers: int,
    out_dir: Path,
    echo: Echo,
    timeout: float = 1800,
) -> dict[str, Any]:
    settings = settings.replace(home=str(out_dir))
    with local_stack(settings, echo) as s:
        upgrade(s.resolved_database_url)
        demo = build_demo_clients(out_dir / "data", train_per_client=16, test_per_client=8)
        for c in (demo * ((clients + len(demo) - 1) // len(demo)))[:clients]:
            name = c.name if clients <= len(demo) else f"{c.name}-{uuid.uuid4().hex[:4]}"
            ops.enroll(s, name, c.train_path, task=c.task)
        enrolled = ops.resolve_clients(s, [], all_=True)
        from services.celery_app import make_app

        send = make_app(s).send_task
        logs = out_dir / "logs"
        with processes.service(s, logs, workers=workers):
            t0 = time.monotonic()
            for i in range(updates):
                c = enrolled[i % len(enrolled)]
                ops.send_train(send, ops.train_request(s, c.id), site=c.site)

            def check() -> tuple[bool, int]:
                with session_scope(s.resolved_database_url) as ses:
                    done = ses.scalar(
                        select(func.count())
                        .select_from(Update)
                        .where(
                            Update.status.in_(
                                (
                                    UpdateStatus.AGGREGATED,
                                    UpdateStatus.REJECTED,
                                    UpdateStatus.FAILED,
                                )
                            )
                        )
                    )
                return done >= updates, int(done or 0)

            ops.wait_for(check, total=updates, timeout=timeout, desc="updates aggregated")
            wall = time.monotonic() - t0
        with session_scope(s.resolved_database_url) as ses:
            rows = ses.execute(
                select(Update.created_at, PersonalizedAdapter.created_at, Update.duration_s).join(
                    PersonalizedAdapter, PersonalizedAdapter.trigger_update_id == Update.id
                )
            ).all()
            statuses = [u for u in ses.scalars(select(Update.status))]
    latencies = [(published - stored).total_seconds() for stored, published, _ in rows]
    train_s = [d for _, _, d in rows if d is not None]
    result = {
        "updates": updates,
        "aggregated": len(latencies),
        "not_aggregated": len([x for x in statuses if x != UpdateStatus.AGGREGATED]),
        "clients": len(enrolled),
        "workers": workers,
        "wall_s": round(wall, 1),
        "updates_per_s": round(len(latencies) / wall, 2),
        "stored_to_personalized_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "max": round(max(latencies), 3),
            "mean": round(statistics.fmean(latencies), 3),
        },
        "finetune_s_p50": round(percentile(train_s, 50), 2) if train_s else None,
        "settings": {
            "max_steps": s.max_steps,
            "batch_size": s.batch_size,
            "max_length": s.max_length,
            "strategy": s.strategy,
        },
    }
    lat = result["stored_to_personalized_s"]
    echo(
        f"{len(latencies)} updates from {len(enrolled)} clients, {workers} workers, "
        f"{wall:.1f}s wall ({result['updates_per_s']} updates/s)\n"
        f"update.stored -> personalized adapter available: p50 {lat['p50']:.3f}s  "
        f"p95 {lat['p95']:.3f}s  max {lat['max']:.3f}s  mean {lat['mean']:.3f}s"
    )
    return result
