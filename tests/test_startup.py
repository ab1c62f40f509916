"""Start-up while a dependency is down: `fedvec aggregator` (the database and the object
store) and `fedvec worker` (the object store) wait for it (retrying with backoff,
FEDVEC_STARTUP_TIMEOUT) instead of exiting, start by themselves once it is back, and give
up with a readable error when it stays away."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable

import pytest
from sqlalchemy.exc import OperationalError

from services import processes
from services.db import SchemaNotReady, upgrade
from services.object_store import TransientStoreError
from services.processes import free_port
from services.s3_server import start_s3_server
from services.transient import wait_until_reachable
from tests.conftest import create_postgres_database, redis_broker_url, service_settings, unavailable

log = logging.getLogger("test.startup")


def flaky(failures: list[BaseException], result: str = "up") -> Callable[[], str]:
    """A start step that raises each of `failures` in turn, then returns `result`."""
    left = list(failures)

    def start() -> str:
        if left:
            raise left.pop(0)
        return result

    return start


# --- the retry loop on its own -------------------------------------------------------------
def test_transient_failures_are_retried_with_backoff_until_the_step_succeeds(caplog):
    slept: list[float] = []
    failures: list[BaseException] = [
        OperationalError("connect", {}, ConnectionRefusedError("refused")),
        TransientStoreError("create bucket failed: Connection refused"),
        ConnectionError("reset"),
    ]
    with caplog.at_level(logging.WARNING):
        got = wait_until_reachable(
            flaky(failures), "the database", timeout=60, backoff_max=4, log=log, sleep=slept.append
        )
    assert got == "up"
    assert len(slept) == 3
    # 1, 2, 4 s with jitter: each drawn from [half, full]
    for delay, full in zip(slept, (1, 2, 4), strict=True):
        assert full / 2 <= delay <= full
    assert "the database unreachable (attempt 1), retry in" in caplog.text
    assert "TransientStoreError" in caplog.text


def test_other_errors_are_not_retried():
    slept: list[float] = []
    refused = SchemaNotReady("database is at revision none: run `fedvec db upgrade`")
    with pytest.raises(SchemaNotReady):
        wait_until_reachable(
            flaky([refused]), "the database", timeout=60, backoff_max=4, log=log, sleep=slept.append
        )
    assert slept == []


def test_the_wait_ends_with_what_stayed_unreachable():
    down = [ConnectionRefusedError("refused")] * 1000
    with pytest.raises(TimeoutError, match=r"the object store still unreachable after 0s.*"):
        wait_until_reachable(flaky(down), "the object store", timeout=0, backoff_max=1, log=log)


# --- real processes -------------------------------------------------------------------------
def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_aggregator_started_while_s3_is_down_waits_and_starts_when_it_is_back(tmp_path):
    try:
        endpoint, stop = start_s3_server()
    except RuntimeError as exc:
        unavailable("S3 test server", exc)
    port = int(endpoint.rsplit(":", 1)[1])
    stop()  # down before the aggregator starts
    url, drop = create_postgres_database()
    stops = [drop]
    proc: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "aggregator.log"
    try:
        upgrade(url)
        settings = service_settings(
            tmp_path,
            url,
            endpoint,
            broker_url=redis_broker_url(),
            recover_interval=0,
            torch_threads=1,
        )
        proc = processes.start("aggregator", settings, log_path)

        def text() -> str:
            return log_path.read_text(errors="replace") if log_path.exists() else ""

        wait_for(
            "the aggregator to report S3 unreachable",
            lambda: "the database or the object store unreachable (attempt" in text(),
        )
        assert proc.poll() is None, text()  # waiting, not exited
        assert "aggregator: strategy fedbip, 1 math threads" in text()  # FEDVEC_TORCH_THREADS
        _, stop_again = start_s3_server(port)  # back on the same address
        stops.append(stop_again)
        wait_for("the aggregator to start consuming", lambda: " ready." in text(), timeout=90)
        assert proc.poll() is None
        assert "Traceback" not in text()
    finally:
        if proc is not None:
            processes.stop(proc)
        for s in reversed(stops):
            s()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "needs"), [("aggregator", "the database"), ("worker", "the object store")]
)
def test_service_gives_up_with_a_readable_error_when_what_it_needs_stays_down(
    tmp_path, s3_endpoint, command, needs
):
    """The aggregator needs the database; a worker needs no database (it has none at a
    site), only the object store."""
    nobody = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    endpoint = s3_endpoint if command == "aggregator" else f"http://127.0.0.1:{free_port()}"
    settings = service_settings(tmp_path, nobody, endpoint, startup_timeout=2)
    log_path = tmp_path / f"{command}.log"
    proc = processes.start(command, settings, log_path)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        processes.stop(proc)
        pytest.fail(f"`fedvec {command}` did not give up: {log_path.read_text()[-3000:]}")
    text = log_path.read_text(errors="replace")
    assert code == 2, text
    if command == "aggregator":  # a worker's first S3 attempt retries inside the client
        assert f"{needs} unreachable (attempt 1), retry in" in text
    assert f"error: {needs} still unreachable after 2s (FEDVEC_STARTUP_TIMEOUT)" in text
    assert "Traceback" not in text
