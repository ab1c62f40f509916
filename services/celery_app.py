"""The Celery app shared by the CLI (which only sends), the training workers and the
aggregator. Queues: `train` (fine-tune and evaluate: the shared GPU pool), `train.SITE`
(the same for clients enrolled at SITE: only that site's workers read their data) and
`aggregate` (update events, one consumer). The broker is Redis in a deployment and
kombu's filesystem transport in the embedded default: only settings differ."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from celery import Celery, Task
from celery.signals import task_failure, task_retry, task_success
from kombu.transport import TRANSPORT_ALIASES

from services import broker_folder, metrics
from services.settings import Settings, load_settings
from services.transient import backoff_seconds, is_transient

log = logging.getLogger(__name__)

TRANSPORT_ALIASES.setdefault(broker_folder.SCHEME, "services.broker_folder:Transport")

TRAIN_QUEUE = "train"
AGGREGATE_QUEUE = "aggregate"
QUEUES = (TRAIN_QUEUE, AGGREGATE_QUEUE)
SHARED_SITES = ("", "default")  # clients and workers of no particular site: the shared pool

TRAIN_TASK = "fedvec.train"
EVALUATE_TASK = "fedvec.evaluate"
AGGREGATE_TASK = "fedvec.aggregate"


def train_queue(site: str) -> str:
    """The queue of a site's training work (a client's private data is read only there)."""
    return TRAIN_QUEUE if site in SHARED_SITES else f"{TRAIN_QUEUE}.{site}"


def queues_for_sites(sites: Sequence[str]) -> list[str]:
    """Every queue of a deployment whose clients are at these sites."""
    return [TRAIN_QUEUE, AGGREGATE_QUEUE] + sorted({train_queue(s) for s in sites} - {TRAIN_QUEUE})


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.resolved_broker_url
    conf: dict[str, Any] = {
        "broker_url": broker,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # the database is where results live
        "task_acks_late": True,  # a task lost with its worker is redelivered
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # long tasks: do not hoard messages
        "task_routes": {
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
            EVALUATE_TASK: {"queue": TRAIN_QUEUE},
            AGGREGATE_TASK: {"queue": AGGREGATE_QUEUE},
        },
        "task_default_queue": TRAIN_QUEUE,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if broker.startswith(("redis://", "rediss://")):
        # how long an unacknowledged task (its worker died) waits before redelivery
        timeout = settings.broker_visibility_timeout
        conf["broker_transport_options"] = {
            "visibility_timeout": timeout,
            # sweep for such tasks every few seconds (kombu's default: every ~100 s)
            "unacked_restore_interval": max(1.0, min(10.0, timeout / 4)),
            "unacked_restore_throttle": 1,
        }
        if settings.site not in SHARED_SITES:
            # a site's in-flight messages under its own keys, which its broker user alone
            # may touch (services/broker_acl.py); kombu's default is one hash for everyone
            queue = train_queue(settings.site)
            conf["broker_transport_options"] |= {
                "unacked_key": f"unacked.{queue}",
                "unacked_index_key": f"unacked.{queue}.index",
                "unacked_mutex_key": f"unacked.{queue}.mutex",
            }
            # remote control (inspect, ping) is a broadcast that every worker hears and any
            # may answer into the caller's reply key: not for workers in other companies
            conf["worker_enable_remote_control"] = False
    if broker.startswith("filesystem://"):
        # the same folder transport, with messages written atomically (broker_folder.py)
        conf["broker_url"] = f"{broker_folder.SCHEME}://"
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval,
        }
        # No fanout exchange to answer `celery inspect` on a folder
        conf["worker_enable_remote_control"] = False
    return conf


def make_app(settings: Settings) -> Celery:
    app = Celery("fedvec", include=["workers.tasks", "aggregator.tasks"])
    app.conf.update(celery_config(settings))
    app.fedvec_settings = settings  # type: ignore[attr-defined]
    return app


app = make_app(load_settings())


# fedvec_tasks_total{task,outcome} of every task this process runs (train, evaluate,
# aggregate), counted from Celery's own signals so that no task body has to remember to.
def _count_task(sender: Task | None, outcome: str) -> None:
    task = metrics.short_task_name(getattr(sender, "name", None))
    metrics.TASKS.labels(task=task, outcome=outcome).inc()


@task_success.connect
def _count_success(sender: Task | None = None, **_: Any) -> None:
    _count_task(sender, "succeeded")


@task_failure.connect
def _count_failure(sender: Task | None = None, **_: Any) -> None:
    _count_task(sender, "failed")


@task_retry.connect
def _count_retry(sender: Task | None = None, **_: Any) -> None:
    _count_task(sender, "retried")


def retry_or_fail(task: Task, exc: Exception, settings: Settings, what: str) -> None:
    """A transient failure (S3 or the database unreachable) is retried with backoff; the
    caller handles anything else, or a transient failure past its retries, as final."""
    retries = task.request.retries
    if is_transient(exc) and retries < settings.task_max_retries:
        delay = backoff_seconds(retries, settings.retry_backoff_max)
        log.warning(
            "%s: transient error, retry %d/%d in %.1fs: %s",
            what,
            retries + 1,
            settings.task_max_retries,
            delay,
            exc,
        )
        metrics.TASK_RETRIES.labels(task=metrics.short_task_name(task.name)).inc()
        raise task.retry(exc=exc, countdown=delay)


def worker_argv(queue: str, *, name: str, loglevel: str = "INFO") -> list[str]:
    """Solo pool: one task at a time in the worker process itself, so the model is loaded
    once and stays loaded (one worker process per GPU)."""
    return [
        "worker",
        "-Q",
        queue,
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-n",
        f"{name}-{os.getpid()}@{socket.gethostname()}",  # several workers per host
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def queue_depths(celery_app: Celery, queues: Sequence[str] = QUEUES) -> dict[str, int | None]:
    """Messages waiting per queue (None where the broker cannot tell)."""
    depths: dict[str, int | None] = {}
    try:
        with celery_app.connection_for_read() as conn:
            channel = conn.default_channel
            for q in queues:
                try:
                    depths[q] = channel.queue_declare(queue=q, passive=True).message_count
                except Exception as exc:
                    # Redis and folder queues exist only while they hold messages
                    depths[q] = 0 if "NOT_FOUND" in str(exc) else None
    except Exception:
        return {q: None for q in queues}
    return depths
