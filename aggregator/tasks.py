"""The aggregate queue's consumer task: one Aggregator per process."""

from __future__ import annotations

from typing import Any

from celery import Task

from aggregator.service import Aggregator
from services.celery_app import AGGREGATE_TASK, app, retry_or_fail

_aggregator: Aggregator | None = None


def get_aggregator() -> Aggregator:
    global _aggregator
    if _aggregator is None:
        _aggregator = Aggregator(app.fedvec_settings)
    return _aggregator


@app.task(name=AGGREGATE_TASK, bind=True, max_retries=None)
def aggregate(self: Task, message: dict[str, Any]) -> str:
    try:
        return get_aggregator().handle(message)
    except Exception as exc:
        # Handling is idempotent (by event and update id), so a retry is safe. An event
        # that fails for good is logged; `fedvec aggregator` start-up recovery picks up
        # stored updates that were never aggregated.
        retry_or_fail(self, exc, app.fedvec_settings, f"event {message.get('event_id')}")
        raise
