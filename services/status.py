"""`fedvec status`: frames of the service's state (clients, last updates, groups, queue
depths), one-shot or --watch, and how they print."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any

from schema.models import UpdateStatus
from services import operations as ops
from services.console import table
from services.settings import Settings

UPDATE_STATUSES = tuple(s.value for s in UpdateStatus)
log = logging.getLogger("fedvec.status")


def one_line(what: str, exc: BaseException) -> str:
    """`WHAT unreachable: <first line of the driver's message>` (SQLAlchemy's own message
    carries the SQL and a documentation link)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return f"{what} unreachable: {lines[0] if lines else type(orig).__name__}"


class StatusSource:
    """Collects status frames for `fedvec status`, one-shot or --watch.

    strict (one-shot): a database that is unreachable or not migrated is an error (exit 2).
    Otherwise (--watch) the frame carries the error and the next frame tries again. The
    broker is never an error: its queue depths are then unknown ('?')."""

    def __init__(self, settings: Settings, *, strict: bool) -> None:
        self.settings = settings
        self.strict = strict
        self.app: Any = None  # made at the first look at the broker
        self.sites: list[str] = []  # the last known, for the queue list in an outage
        self.frames = 0
        self._aggregated: int | None = None  # at the previous frame with data
        self._at = 0.0

    def collect(self) -> dict[str, Any]:
        from services.db import check_schema

        started = time.monotonic()
        self.frames += 1
        frame: dict[str, Any] = {
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
            "frame": self.frames,
            "error": None,
            "broker_error": None,
            "summary": None,
            "status": None,
        }
        try:
            check_schema(self.settings.resolved_database_url)
            self.sites = [c["site"] for c in ops.list_clients(self.settings)]
        except Exception as exc:
            frame["error"] = self._db_error(exc)
        frame["queues"], frame["broker_error"] = self._queue_depths()
        if frame["error"] is None:
            try:
                frame["status"] = ops.status(self.settings, frame["queues"])
            except Exception as exc:
                frame["error"] = self._db_error(exc)
        if frame["status"] is not None:
            frame["summary"] = self._summary(frame["status"], started)
        return frame

    def _db_error(self, exc: Exception) -> str:
        from sqlalchemy.exc import SQLAlchemyError

        from services.db import SchemaNotReady, redact_url

        if isinstance(exc, SchemaNotReady):
            if self.strict:
                raise exc
            return f"database not ready: {exc}"
        if isinstance(exc, SQLAlchemyError | OSError):
            url = redact_url(self.settings.resolved_database_url)
            message = f"{one_line('database', exc)} ({url})"
            if self.strict:
                raise exc  # the CLI says it in one line, as for every command (exit 3)
            return message
        if self.strict:
            raise exc
        log.debug("status frame failed", exc_info=True)
        return f"status failed: {type(exc).__name__}: {exc}"

    def _queue_depths(self) -> tuple[dict[str, int | None], str | None]:
        from services.celery_app import make_app, queue_depths, queues_for_sites

        if self.app is None:
            self.app = make_app(self.settings)
        queues = queues_for_sites(self.sites)
        try:  # one quick try: queue_depths alone retries for seconds on a dead broker
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        except Exception as exc:
            return {q: None for q in queues}, one_line("broker", exc)
        return queue_depths(self.app, queues), None

    def _summary(self, data: dict[str, Any], started: float) -> dict[str, Any]:
        counts = {s: 0 for s in UPDATE_STATUSES} | {k: int(v) for k, v in data["updates"].items()}
        since = rate = None
        if self._aggregated is not None:
            since = counts["aggregated"] - self._aggregated
            elapsed = started - self._at
            rate = round(since / elapsed, 3) if elapsed > 0 else None
        self._aggregated, self._at = counts["aggregated"], started
        return {
            "updates": counts,
            "aggregated_since_last_frame": since,
            "aggregated_per_s": rate,
            "grouping_version": data["groups"]["version"],
        }


def render_status(frame: dict[str, Any], header: str | None = None) -> str:
    """One frame as text. Without header: what one-shot `fedvec status` always printed."""
    lines = []
    if header is not None:
        lines.append(f"fedvec status  {frame['time']}  {header}")
    if frame["error"]:
        lines.append(frame["error"])
    data, summary = frame["status"], frame["summary"]
    if header is not None and summary is not None:
        since = summary["aggregated_since_last_frame"]
        rate = summary["aggregated_per_s"]
        lines.append(
            "updates: "
            + ", ".join(f"{s} {n}" for s, n in summary["updates"].items())
            + " | aggregated since last frame: "
            + ("-" if since is None else f"{since} ({rate if rate is not None else '-'}/s)")
            + f" | grouping version {summary['grouping_version'] or '-'}"
        )
    if data is not None:
        group_of = {c: g["group"] for g in data["groups"]["groups"] for c in g["clients"]}
        rows = []
        for r in data["clients"]:
            last = r["last_update"] or {}
            rows.append(
                [
                    r["client"],
                    r["site"],
                    r["personalized_version"],
                    group_of.get(r["client"], "-"),
                    last.get("status", "-"),
                    last.get("at", "-")[:19],
                    last.get("reason") or "",
                ]
            )
        lines.append(
            f"strategy {data['strategy']}; updates: {ops.count_phrase(data['updates'])}; "
            f"last round: {_round(data['last_round'])}"
        )
        lines.append(
            table(rows, ["client", "site", "version", "group", "last update", "at", "note"])
        )
    queues = "queues: " + ", ".join(
        f"{q}={'?' if n is None else n}" for q, n in frame["queues"].items()
    )
    if frame["broker_error"]:
        queues += f" ({frame['broker_error']})"
    lines.append(queues)
    return "\n".join(lines)


def _round(last: dict[str, Any] | None) -> str:
    return "none" if last is None else f"{last['id']} ({last['status']})"


def frame_json(frame: dict[str, Any]) -> str:
    """One JSON line of `status --json --watch`; its "status" is the one-shot object."""
    keys = ("time", "frame", "error", "broker_error", "summary", "status")
    return json.dumps({k: frame[k] for k in keys}, default=str)
