"""The Celery app shared by the CLI (which only sends), the training workers and the
aggregator. Two queues: `train` (fine-tune and evaluate, GPU workers) and `aggregate`
(update events, one consumer). The broker is Redis in a deployment and kombu's
filesystem transport in the embedded default: only settings differ."""

from __future__ import annotations

import socket
from typing import Any

from celery import Celery

from services.settings import Settings, load_settings

TRAIN_QUEUE = "train"
AGGREGATE_QUEUE = "aggregate"
QUEUES = (TRAIN_QUEUE, AGGREGATE_QUEUE)

TRAIN_TASK = "fedvec.train"
EVALUATE_TASK = "fedvec.evaluate"
AGGREGATE_TASK = "fedvec.aggregate"


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
    if broker.startswith("filesystem://"):
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
        f"{name}@{socket.gethostname()}",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def queue_depths(celery_app: Celery) -> dict[str, int | None]:
    """Messages waiting per queue (None where the broker cannot tell)."""
    depths: dict[str, int | None] = {}
    try:
        with celery_app.connection_for_read() as conn:
            channel = conn.default_channel
            for q in QUEUES:
                try:
                    depths[q] = channel.queue_declare(queue=q, passive=True).message_count
                except Exception:
                    depths[q] = None
    except Exception:
        return {q: None for q in QUEUES}
    return depths
