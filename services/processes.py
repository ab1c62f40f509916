"""Starting fedvec's own processes (worker, aggregator) as children, with settings passed
through the environment: how the demo and the end-to-end tests run the real service."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.settings import Settings, env_name


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (for a child server, or as an
    address where nobody answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[env_name(f.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start(command: str, settings: Settings, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`fedvec <command>` as a child process, logging to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", command, *extra],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # Celery: warm shutdown
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def service(
    settings: Settings, log_dir: Path, workers: int = 1
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Workers and one aggregator running for the duration of the block."""
    procs = [start("aggregator", settings, log_dir / "aggregator.log")]
    procs += [start("worker", settings, log_dir / f"worker-{i}.log") for i in range(workers)]
    try:
        yield procs
    finally:
        for p in procs:
            stop(p)
