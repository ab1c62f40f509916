"""The worker tasks: fine-tune a client (θ̄_i -> θ_i, τ_i = θ_i − θ̄_i) and evaluate a
client's personalized adapter.

Order of writes, so nothing is ever half-written: objects first (under the update's own
uid), then the database row in one transaction, then the `update.stored` event. A crash
before the commit leaves only unreferenced objects under a fresh uid; a redelivered
request with the same id finds its row and does nothing twice.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from aggregator.sketch import sketch_state_dict
from aggregator.sketch import to_bytes as sketch_bytes
from aggregator.task_vectors import StateDict, norm, task_vector
from schema.events import EvaluateRequest, Message, TrainRequest, UpdateFailed, UpdateStored
from schema.models import Evaluation, Update, UpdateStatus
from services import adapter_store as ads
from services import metrics
from services.celery_app import AGGREGATE_TASK, EVALUATE_TASK, TRAIN_TASK, app, retry_or_fail
from services.client_data import load_examples
from services.context import object_store
from services.db import session_scope
from services.object_store import ObjectStore
from services.settings import Settings
from services.signing import read_secrets, secret_for, sign_update
from workers.model import (
    ModelRuntime,
    TrainResult,
    get_runtime,
    lora_config,
    metric_name,
    training_seed,
)

log = logging.getLogger(__name__)

Publish = Callable[[Message], None]

_INITIAL_WRITTEN: set[str] = set()  # stores that hold the initial adapter already


def ensure_initial_adapter(store: ObjectStore, runtime: ModelRuntime, settings: Settings) -> None:
    """Write the shared starting adapter and its peft config once. Every worker computes
    the same bytes (seeded, on the CPU), so two workers racing here is harmless."""
    if store.describe() in _INITIAL_WRITTEN:  # checked once per process, not per task
        return
    if store.exists(ads.INITIAL_ADAPTER_KEY) and store.exists(ads.ADAPTER_CONFIG_KEY):
        _INITIAL_WRITTEN.add(store.describe())
        return
    config = lora_config(settings).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    store.put(ads.ADAPTER_CONFIG_KEY, json.dumps(config, indent=2, default=list).encode())
    ads.put_state(store, ads.INITIAL_ADAPTER_KEY, runtime.initial_adapter())
    _INITIAL_WRITTEN.add(store.describe())


def load_base(
    req: TrainRequest | EvaluateRequest, store: ObjectStore, settings: Settings
) -> StateDict:
    """The adapter the request names, checked against its sha256 (none: the initial one)."""
    return ads.get_state(
        store, req.base_key, max_bytes=settings.max_adapter_bytes, expected_sha256=req.base_sha256
    )


def record_training(result: TrainResult) -> None:
    """Duration, volume and throughput of one fine-tune (the gauges: the last task's)."""
    metrics.FINETUNE_SECONDS.observe(result.duration_s)
    metrics.FINETUNE_SAMPLES.inc(result.samples)
    metrics.FINETUNE_TOKENS.inc(result.tokens)
    if result.duration_s > 0:
        metrics.FINETUNE_SAMPLES_PER_SECOND.set(result.samples / result.duration_s)
        metrics.FINETUNE_TOKENS_PER_SECOND.set(result.tokens / result.duration_s)


def run_training(
    settings: Settings, req: TrainRequest, publish: Publish, worker: str | None = None
) -> dict[str, Any]:
    """`worker`: who trained it, kept on the update row (the Celery node name)."""
    db_url = settings.resolved_database_url
    uid, name = req.request_id, req.client_name
    with session_scope(db_url) as s:
        existing = s.scalars(select(Update).where(Update.uid == uid)).first()
        if existing is not None:  # redelivered: the work is done
            log.info("client=%s update=%s already %s", name, uid, existing.status)
            return {"update_uid": uid, "status": existing.status, "duplicate": True}
    # a client whose updates the server verifies is trained only where its key is: refuse
    # before training
    site_key = (
        secret_for(settings.client_secrets_path, req.client_id)
        if req.signed
        else read_secrets(settings.client_secrets_path).get(str(req.client_id))
    )
    store = object_store(settings)
    adapter_key, tv_key = ads.update_keys(req.client_id, uid)
    try:
        runtime = get_runtime(settings)
        ensure_initial_adapter(store, runtime, settings)
        examples = load_examples(req.data_path)
        start = load_base(req, store, settings)
        seed = training_seed(settings, req.client_id, req.base_version)
        every = max(1, runtime.planned_steps(len(examples)) // 4)

        def progress(step: int, total: int, loss: float) -> None:
            if step % every == 0 or step == total:
                log.info("client=%s update=%s step %d/%d loss %.4f", name, uid, step, total, loss)

        log.info(
            "client=%s update=%s training from version %d on %d examples",
            name,
            uid,
            req.base_version,
            len(examples),
        )
        result = runtime.train(start, examples, seed=seed, progress=progress)
        record_training(result)
        tau = task_vector(result.adapter, start)
        tau_norm = norm(tau)
        # the sketch is made here, where τ already is (on the GPU when training ran there)
        sk = (
            sketch_bytes(sketch_state_dict(tau, settings.sketch_dim, settings.sketch_seed))
            if settings.sketch_dim > 0
            else None
        )
        meta = {"client_id": str(req.client_id), "update_uid": uid}
        adapter_sha = ads.put_state(store, adapter_key, result.adapter, **meta)
        tv_sha = ads.put_state(store, tv_key, tau, **meta)
        signature = (
            sign_update(site_key, req.client_id, uid, adapter_sha, tv_sha) if site_key else None
        )
        row = Update(
            uid=uid,
            client_id=req.client_id,
            round_id=req.round_id,
            base_version=req.base_version,
            status=UpdateStatus.STORED,
            adapter_key=adapter_key,
            adapter_sha256=adapter_sha,
            task_vector_key=tv_key,
            task_vector_sha256=tv_sha,
            task_vector_norm=tau_norm,
            sketch=sk,
            signature=signature,
            num_examples=len(examples),
            steps=result.steps,
            train_loss=result.loss,
            duration_s=result.duration_s,
            worker=worker or socket.gethostname(),
        )
        with session_scope(db_url) as s:
            s.add(row)
    except IntegrityError:
        # another delivery of this request committed first
        log.info("client=%s update=%s committed by another delivery", name, uid)
        return {"update_uid": uid, "status": UpdateStatus.STORED.value, "duplicate": True}
    except Exception as exc:
        log.warning("client=%s update=%s attempt failed: %s", name, uid, exc)
        for key in (adapter_key, tv_key):  # nothing half-written stays behind
            try:
                store.delete(key)
            except Exception:  # noqa: BLE001 - the store may be what failed
                log.warning("client=%s update=%s could not delete %s", name, uid, key)
        raise
    log.info(
        "client=%s update=%s stored: %d steps in %.1fs, loss %.4f, |tau| %.4f",
        name,
        uid,
        result.steps,
        result.duration_s,
        result.loss,
        tau_norm,
    )
    publish(UpdateStored(update_uid=uid, client_id=req.client_id, round_id=req.round_id))
    return {
        "update_uid": uid,
        "status": UpdateStatus.STORED.value,
        "steps": result.steps,
        "loss": result.loss,
    }


def record_failure(settings: Settings, req: TrainRequest, reason: str, publish: Publish) -> None:
    """A failed update row, so `fedvec status` shows it and a round does not wait forever."""
    try:
        with session_scope(settings.resolved_database_url) as s:
            s.add(
                Update(
                    uid=req.request_id,
                    client_id=req.client_id,
                    round_id=req.round_id,
                    base_version=-1,
                    status=UpdateStatus.FAILED,
                    reason=reason[:2000],
                    worker=socket.gethostname(),
                )
            )
    except IntegrityError:
        return  # a row for this request exists already
    publish(UpdateFailed(update_uid=req.request_id, client_id=req.client_id, round_id=req.round_id))


def run_evaluation(settings: Settings, req: EvaluateRequest) -> dict[str, Any]:
    db_url = settings.resolved_database_url
    with session_scope(db_url) as s:
        done = s.scalars(select(Evaluation).where(Evaluation.uid == req.request_id)).first()
        if done is not None:  # redelivered: the work is done
            return {"client_id": req.client_id, "version": done.adapter_version, "duplicate": True}
    name = req.client_name
    examples = load_examples(req.test_path)
    if req.max_examples > 0:
        examples = examples[: req.max_examples]
    store = object_store(settings)
    runtime = get_runtime(settings)
    ensure_initial_adapter(store, runtime, settings)
    runtime.load_adapter(load_base(req, store, settings))
    accuracy, loss, balanced = runtime.evaluate(examples)
    metric = metric_name(examples)
    try:
        with session_scope(db_url) as s:
            s.add(
                Evaluation(
                    uid=req.request_id,
                    client_id=req.client_id,
                    adapter_version=req.base_version,
                    metric=metric,
                    accuracy=accuracy,
                    balanced_accuracy=balanced,
                    loss=loss,
                    num_examples=len(examples),
                )
            )
    except IntegrityError:  # another delivery of this request committed first
        return {"client_id": req.client_id, "version": req.base_version, "duplicate": True}
    log.info(
        "client=%s evaluated version %d: %s %.3f on %d examples",
        name,
        req.base_version,
        metric,
        accuracy,
        len(examples),
    )
    return {"client_id": req.client_id, "version": req.base_version, "accuracy": accuracy}


def publish_event(message: Message) -> None:
    # declare=[]: no queue declaration on the way (a write to the aggregate queue's binding
    # set); a site's broker user may only push onto the aggregate queue (broker_acl.py)
    app.send_task(AGGREGATE_TASK, args=[message.to_dict()], declare=[])


@app.task(name=TRAIN_TASK, bind=True, max_retries=None)
def train(self: Task, message: dict[str, Any]) -> dict[str, Any]:
    settings = app.fedvec_settings
    req = TrainRequest.from_dict(message)  # a malformed request fails here, unretried
    try:
        return run_training(settings, req, publish_event, worker=self.request.hostname)
    except Exception as exc:
        retry_or_fail(self, exc, settings, f"client_id={req.client_id} update={req.request_id}")
        log.exception("client_id=%s update=%s failed: %s", req.client_id, req.request_id, exc)
        record_failure(settings, req, f"{type(exc).__name__}: {exc}", publish_event)
        raise


@app.task(name=EVALUATE_TASK, bind=True, max_retries=None)
def evaluate(self: Task, message: dict[str, Any]) -> dict[str, Any]:
    settings = app.fedvec_settings
    req = EvaluateRequest.from_dict(message)
    try:
        return run_evaluation(settings, req)
    except Exception as exc:
        retry_or_fail(self, exc, settings, f"client_id={req.client_id} evaluation")
        raise
