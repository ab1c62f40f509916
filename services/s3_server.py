"""A real S3 HTTP server on loopback (moto's, in a thread of this process), for the tests
and the benchmarks when no MinIO is at hand. moto comes with the test extra."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

_START_TIMEOUT_S = 15.0


def start_s3_server(port: int = 0) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 server on 127.0.0.1 (port 0: a free one); return
    ("127.0.0.1:PORT", stop)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # moto[server] missing from the environment
        raise RuntimeError(f"moto[server] is not importable: {exc}") from exc

    # Port 0: the OS picks a free port at bind time, so there is no probe-then-bind race.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    # ThreadedMotoServer.start() waits forever if binding fails inside its thread, so
    # call it from a helper thread and give up after a deadline.
    failure: list[BaseException] = []

    def _start() -> None:
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failure.append(exc)

    starter = threading.Thread(target=_start, daemon=True)
    starter.start()
    starter.join(_START_TIMEOUT_S)
    if starter.is_alive() or failure:
        raise RuntimeError(f"moto S3 server did not start: {failure[0] if failure else 'timeout'}")

    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            # Any HTTP answer (even an error status) proves the server is serving.
            with urllib.request.urlopen(f"http://{endpoint}/", timeout=2):
                pass
            break
        except urllib.error.HTTPError:
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto S3 server at {endpoint} does not answer: {exc}") from exc
            time.sleep(0.05)

    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.stop()

    return endpoint, stop
