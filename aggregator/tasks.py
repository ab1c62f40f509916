"""The aggregate queue's consumer task: one Aggregator per process."""

from __future__ import annotations

from typing import Any

from aggregator.service import Aggregator
from workers.celery_app import AGGREGATE_TASK, app

_aggregator: Aggregator | None = None


def get_aggregator() -> Aggregator:
    global _aggregator
    if _aggregator is None:
        _aggregator = Aggregator(app.fedvec_settings)
    return _aggregator


@app.task(name=AGGREGATE_TASK)
def aggregate(message: dict[str, Any]) -> str:
    return get_aggregator().handle(message)
