"""Prometheus metrics. Labels are bounded (reasons, outcomes, queues), never ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

UPDATES_RECEIVED = Counter("fedvec_updates_received_total", "update.stored events received")
UPDATES_AGGREGATED = Counter(
    "fedvec_updates_aggregated_total", "Updates turned into a personalized adapter"
)
UPDATES_REJECTED = Counter(
    "fedvec_updates_rejected_total", "Updates refused by the aggregator", ["reason"]
)
EVENTS = Counter("fedvec_events_total", "Aggregator events by outcome", ["outcome"])
REGROUPS = Counter("fedvec_regroup_events_total", "New group versions written")
AGGREGATION_SECONDS = Histogram(
    "fedvec_aggregation_seconds", "Time to aggregate and publish personalized adapters"
)
STORED_TO_PUBLISHED_SECONDS = Histogram(
    "fedvec_update_to_personalized_seconds",
    "Time from an update's row being stored to its personalized adapter being published",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
FINETUNE_SECONDS = Histogram(
    "fedvec_finetune_seconds", "Worker fine-tune duration", buckets=(1, 5, 10, 30, 60, 300, 900)
)

TASK_RETRIES = Counter(
    "fedvec_task_retries_total", "Tasks retried after a transient S3 or database error", ["task"]
)


def serve(port: int) -> None:
    """Expose /metrics of this process on `port` (0: do nothing)."""
    if port > 0:
        start_http_server(port)
