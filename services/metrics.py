"""Prometheus metrics of the worker and aggregator processes.

Labels are bounded (reasons, outcomes, task names, operations), never update ids;
per-client series come only from the exporter (services/metrics_exporter.py), where
enrollment bounds them. Workers run Celery's solo pool, one process per worker with its
own /metrics port (FEDVEC_METRICS_PORT), so the plain default registry is enough: no
prometheus_client multiprocess mode.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# --- aggregator -----------------------------------------------------------------------
UPDATES_RECEIVED = Counter(
    "fedvec_updates_received_total", "update.reported and update.stored events received"
)
UPDATES_AGGREGATED = Counter(
    "fedvec_updates_aggregated_total", "Updates turned into a personalized adapter"
)
UPDATES_REJECTED = Counter(
    "fedvec_updates_rejected_total", "Updates refused by the aggregator", ["reason"]
)
UPDATES_QUARANTINED = Counter(
    "fedvec_updates_quarantined_total",
    "Updates held out of every aggregate as likely poisoned (aggregator/outliers.py)",
    ["reason"],
)
REPORTS_REFUSED = Counter(
    "fedvec_reports_refused_total",
    "Worker reports refused before anything was written (aggregator/intake.py)",
    ["reason"],
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
UPDATE_STALENESS = Histogram(
    "fedvec_update_staleness",
    "Versions an update is behind its client's personalized adapter when aggregated "
    "(the staleness its weight is discounted by)",
    buckets=(0, 1, 2, 3, 5, 10, 20),
)
SIMILARITY_INDEX_ENTRIES = Gauge(
    "fedvec_similarity_index_entries", "Entries in the similarity index after the last aggregation"
)
SIMILARITY_INDEX_CLIENTS = Gauge(
    "fedvec_sketch_index_clients",
    "Clients in the aggregator's in-memory sketch index (FEDVEC_AGGREGATE_PEERS > 0)",
)
GROUPS_CURRENT = Gauge("fedvec_groups_current", "Groups after the last aggregation")
GROUP_SIZE = Histogram(
    "fedvec_group_size",
    "Sizes of the groups of each new grouping version",
    buckets=(1, 2, 3, 5, 10, 20, 50, 100, 1000),
)
ROUNDS_COMPLETED = Counter("fedvec_rounds_completed_total", "Synchronous rounds aggregated")

# --- worker ---------------------------------------------------------------------------
FINETUNE_SECONDS = Histogram(
    "fedvec_finetune_seconds", "Worker fine-tune duration", buckets=(1, 5, 10, 30, 60, 300, 900)
)
FINETUNE_SAMPLES = Counter("fedvec_finetune_samples_total", "Training examples fine-tuned on")
FINETUNE_TOKENS = Counter(
    "fedvec_finetune_tokens_total", "Non-padding input tokens the model saw while fine-tuning"
)
FINETUNE_SAMPLES_PER_SECOND = Gauge(
    "fedvec_finetune_samples_per_second", "Training examples per second of the last fine-tune"
)
FINETUNE_TOKENS_PER_SECOND = Gauge(
    "fedvec_finetune_tokens_per_second", "Input tokens per second of the last fine-tune"
)
TASKS = Counter(
    "fedvec_tasks_total",
    "Celery tasks run by this process (task: train, evaluate, aggregate)",
    ["task", "outcome"],  # outcome: succeeded | failed | retried
)
TASK_RETRIES = Counter(
    "fedvec_task_retries_total", "Tasks retried after a transient S3 or database error", ["task"]
)

# --- object store (every process) -----------------------------------------------------
OBJECT_STORE_BYTES = Counter(
    "fedvec_object_store_bytes_total", "Bytes moved to or from the object store", ["operation"]
)
OBJECT_STORE_SECONDS = Histogram(
    "fedvec_object_store_seconds",
    "Latency of object store transfers",
    ["operation"],  # put | get
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# Known label values start at 0: a labelled counter is otherwise born at its first
# increment, with value 1, and rate()/increase() miss that first rejection or failure.
REJECT_REASONS = (
    "invalid_file",
    "missing_object",
    "non_finite",
    "invalid_tensor",
)
# = aggregator.intake.REFUSED
REFUSE_REASONS = ("unknown-update", "unknown-client", "mismatch", "unsigned", "bad-signature")
QUARANTINE_REASONS = ("norm_outlier", "sign_flipped")  # = aggregator.outliers.REASONS
EVENT_OUTCOMES = (
    "invalid",
    "duplicate",
    "accepted",
    "aggregated",
    "round-aggregated",
    "rejected",
    "quarantined",
    "superseded",
    "failed",
    "evaluated",
    "evaluation-failed",
    *REFUSE_REASONS,
)
TASK_NAMES = ("train", "evaluate", "aggregate")
for _reason in REJECT_REASONS:
    UPDATES_REJECTED.labels(reason=_reason)
for _reason in REFUSE_REASONS:
    REPORTS_REFUSED.labels(reason=_reason)
for _reason in QUARANTINE_REASONS:
    UPDATES_QUARANTINED.labels(reason=_reason)
for _outcome in EVENT_OUTCOMES:
    EVENTS.labels(outcome=_outcome)
for _task in TASK_NAMES:
    TASK_RETRIES.labels(task=_task)
    for _outcome in ("succeeded", "failed", "retried"):
        TASKS.labels(task=_task, outcome=_outcome)
for _operation in ("put", "get"):
    OBJECT_STORE_BYTES.labels(operation=_operation)


def _version() -> str:
    try:
        return package_version("fedvec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


BUILD_INFO = Gauge("fedvec_build_info", "fedvec version of this process (always 1)", ["version"])
BUILD_INFO.labels(version=_version()).set(1)


def short_task_name(name: str | None) -> str:
    """`fedvec.train` -> `train`: the bounded task label."""
    return (name or "unknown").rsplit(".", 1)[-1]


def serve(port: int) -> None:
    """Expose /metrics of this process on `port` (0: do nothing)."""
    if port > 0:
        start_http_server(port)
