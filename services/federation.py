"""A fresh embedded federation, and the real service running on it: what the demo and the
benchmarks start each run from (the same code path as a deployment; only settings differ)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import operations as ops
from services import processes
from services.client_data import ClientSpec
from services.db import upgrade
from services.settings import Settings


def fresh_federation(
    settings: Settings, home: Path, clients: Sequence[ClientSpec], **overrides: Any
) -> Settings:
    """Wipe `home`, put every embedded default in it (SQLite, object-store folder, broker
    folder), migrate the schema and enroll `clients`; returns the run's settings."""
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)  # the engine of this database URL may be cached already
    s = settings.replace(
        home=str(home), database_url="", object_store_url="", broker_url="", **overrides
    )
    upgrade(s.resolved_database_url)
    for c in clients:
        ops.enroll(s, c.name, c.train_path, test=c.test_path, task=c.task)
    return s


@dataclass
class RunningService:
    """Workers and an aggregator as child processes, and how to send them work."""

    send: Callable[..., Any]  # Celery's send_task
    procs: list[subprocess.Popen[bytes]]
    log_dir: Path

    def alive(self) -> None:
        """Fail fast, instead of at a timeout, when a worker or the aggregator died."""
        if any(p.poll() is not None for p in self.procs):
            raise ops.OperationError(f"a fedvec process exited; see the logs in {self.log_dir}")


@contextmanager
def running(settings: Settings, log_dir: Path, workers: int = 1) -> Iterator[RunningService]:
    from services.celery_app import make_app

    with processes.service(settings, log_dir, workers=workers) as procs:
        yield RunningService(make_app(settings).send_task, procs, log_dir)
