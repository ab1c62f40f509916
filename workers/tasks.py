"""The worker tasks: fine-tune a client (θ̄_i -> θ_i, τ_i = θ_i − θ̄_i) and evaluate a
client's personalized adapter.

A worker runs at a client's site and holds no server secret: it reads no database (what it
needs comes in the request) and writes none. It reports through the broker, in events the
aggregator verifies with the client's public key before it records anything
(schema/events.py).

Order of writes, so nothing is ever half-written: the update's objects under its own uid,
then its signed report (adapter_store.report_key), then the `update.reported` event. An
update whose report exists is complete and never rewritten: a redelivered request sends
the stored report again (the aggregator takes each update once). A crash before the report
leaves objects nobody refers to, which the redelivery overwrites.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from celery import Task

from aggregator.sketch import sketch_state_dict
from aggregator.sketch import to_bytes as sketch_bytes
from aggregator.task_vectors import StateDict, norm, task_vector
from schema.events import (
    EvaluateRequest,
    EvaluationReported,
    InvalidMessage,
    Message,
    TrainRequest,
    UpdateFailed,
    UpdateReported,
)
from services import adapter_store as ads
from services import metrics
from services.celery_app import AGGREGATE_TASK, EVALUATE_TASK, TRAIN_TASK, app, retry_or_fail
from services.client_data import load_examples
from services.context import object_store
from services.object_store import ObjectNotFound, ObjectStore
from services.settings import Settings
from services.signing import find_secret, secret_for, sign_report
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


class ReportNotSent(Exception):
    """The update is complete (its report is stored) but the event did not go out: a retry
    sends the stored report, and past the retries the aggregator's recovery pass finds it.
    Never reported as failed."""


def site_key(settings: Settings, client_id: int, name: str, signed: bool) -> str | None:
    """The client's key from the site's keys file. A client whose reports the server verifies
    is served only where its key is: a worker without it refuses (SigningError) before any
    work."""
    if signed:
        return secret_for(settings.client_secrets_path, client_id, name)
    return find_secret(settings.client_secrets_path, client_id, name)


def stored_report(store: ObjectStore, client_id: int, uid: str) -> UpdateReported | None:
    """The report of an update this site completed before (None: not completed)."""
    try:
        data = store.get(ads.report_key(client_id, uid))
    except ObjectNotFound:
        return None
    try:
        return UpdateReported.from_dict(json.loads(bytes(data)))
    except (ValueError, InvalidMessage):
        return None  # unreadable: train again and overwrite it


def run_training(
    settings: Settings, req: TrainRequest, publish: Publish, worker: str | None = None
) -> dict[str, Any]:
    """`worker`: who trained it, kept on the update row (the Celery node name)."""
    uid, name = req.request_id, req.client_name
    key = site_key(settings, req.client_id, req.client_name, req.signed)
    store = object_store(settings)
    done = stored_report(store, req.client_id, uid)
    if done is not None:  # redelivered: the work is done; its report may not have gone out
        log.info("client=%s update=%s already stored: its report sent again", name, uid)
        publish(done)
        return {"update_uid": uid, "status": "stored", "duplicate": True}
    adapter_key, tv_key = ads.update_keys(req.client_id, uid)
    written = [adapter_key, tv_key, ads.sketch_key(req.client_id, uid)]
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
        meta = {"client_id": str(req.client_id), "update_uid": uid}
        adapter_sha = ads.put_state(store, adapter_key, result.adapter, **meta)
        tv_sha = ads.put_state(store, tv_key, tau, **meta)
        sketch_sha = None
        if settings.sketch_dim > 0:
            # made here, where τ already is (on the GPU when training ran there)
            sk = sketch_bytes(sketch_state_dict(tau, settings.sketch_dim, settings.sketch_seed))
            store.put(written[2], sk)
            sketch_sha = ads.sha256(sk)
        report = UpdateReported(
            update_uid=uid,
            client_id=req.client_id,
            round_id=req.round_id,
            base_version=req.base_version,
            adapter_sha256=adapter_sha,
            task_vector_sha256=tv_sha,
            sketch_sha256=sketch_sha,
            task_vector_norm=norm(tau),
            num_examples=len(examples),
            steps=result.steps,
            train_loss=result.loss,
            duration_s=result.duration_s,
            worker=worker or socket.gethostname(),
            signature=None,
        )
        if key is not None:
            report = dataclasses.replace(report, signature=sign_report(key, report.signed_bytes()))
        # last: from here on the update is complete and is only ever sent again
        store.put(ads.report_key(req.client_id, uid), json.dumps(report.to_dict()).encode())
    except Exception as exc:
        log.warning("client=%s update=%s attempt failed: %s", name, uid, exc)
        for k in written:  # nothing half-written stays behind
            try:
                store.delete(k)
            except Exception:  # noqa: BLE001 - the store may be what failed
                log.warning("client=%s update=%s could not delete %s", name, uid, k)
        raise
    try:
        publish(report)
    except Exception as exc:
        raise ReportNotSent(f"update {uid} is stored but its report was not sent: {exc}") from exc
    log.info(
        "client=%s update=%s stored: %d steps in %.1fs, loss %.4f, |tau| %.4f",
        name,
        uid,
        result.steps,
        result.duration_s,
        result.loss,
        report.task_vector_norm,
    )
    return {"update_uid": uid, "status": "stored", "steps": result.steps, "loss": result.loss}


def report_failure(req: TrainRequest, reason: str, publish: Publish) -> None:
    """The worker gave up: the aggregator marks the update failed, so `fedvec status` shows
    it and a round does not wait for it forever."""
    publish(
        UpdateFailed(
            update_uid=req.request_id,
            client_id=req.client_id,
            round_id=req.round_id,
            reason=reason[:2000],
        )
    )


def run_evaluation(settings: Settings, req: EvaluateRequest, publish: Publish) -> dict[str, Any]:
    name = req.client_name
    key = site_key(settings, req.client_id, req.client_name, req.signed)
    examples = load_examples(req.test_path)
    if req.max_examples > 0:
        examples = examples[: req.max_examples]
    store = object_store(settings)
    runtime = get_runtime(settings)
    ensure_initial_adapter(store, runtime, settings)
    runtime.load_adapter(load_base(req, store, settings))
    accuracy, loss, balanced = runtime.evaluate(examples)
    metric = metric_name(examples)
    scores = {"metric": metric, "accuracy": accuracy, "balanced_accuracy": balanced}
    publish(evaluation_report(req, key, **scores, loss=loss, num_examples=len(examples)))
    log.info(
        "client=%s evaluated version %d: %s %.3f on %d examples",
        name,
        req.base_version,
        metric,
        accuracy,
        len(examples),
    )
    return {"client_id": req.client_id, "version": req.base_version, "accuracy": accuracy}


def evaluation_report(
    req: EvaluateRequest,
    key: str | None,
    *,
    metric: str = "",
    accuracy: float | None = None,
    balanced_accuracy: float | None = None,
    loss: float | None = None,
    num_examples: int = 0,
    reason: str | None = None,
) -> EvaluationReported:
    """The evaluation's report (scores, or the reason there are none), signed with key."""
    report = EvaluationReported(
        evaluation_uid=req.request_id,
        client_id=req.client_id,
        adapter_version=req.base_version,
        metric=metric,
        accuracy=accuracy,
        balanced_accuracy=balanced_accuracy,
        loss=loss,
        num_examples=num_examples,
        reason=reason,
        signature=None,
    )
    if key is None:
        return report
    return dataclasses.replace(report, signature=sign_report(key, report.signed_bytes()))


def report_evaluation_failure(
    settings: Settings, req: EvaluateRequest, reason: str, publish: Publish
) -> None:
    """The evaluation could not be done: reported, so that `fedvec evaluate` stops waiting."""
    try:
        key = site_key(settings, req.client_id, req.client_name, req.signed)
    except Exception:  # noqa: BLE001 - the missing key may be why it failed: sent unsigned
        key = None
    publish(evaluation_report(req, key, reason=reason[:2000]))


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
        cause = exc.__cause__ if isinstance(exc, ReportNotSent) else exc  # the broker away?
        what = f"client_id={req.client_id} update={req.request_id}"
        retry_or_fail(self, cause if isinstance(cause, Exception) else exc, settings, what)
        log.exception("client_id=%s update=%s failed: %s", req.client_id, req.request_id, exc)
        if not isinstance(exc, ReportNotSent):
            report_failure(req, f"{type(exc).__name__}: {exc}", publish_event)
        raise


@app.task(name=EVALUATE_TASK, bind=True, max_retries=None)
def evaluate(self: Task, message: dict[str, Any]) -> dict[str, Any]:
    settings = app.fedvec_settings
    req = EvaluateRequest.from_dict(message)
    try:
        return run_evaluation(settings, req, publish_event)
    except Exception as exc:
        retry_or_fail(self, exc, settings, f"client_id={req.client_id} evaluation")
        log.exception("client_id=%s evaluation=%s failed: %s", req.client_id, req.request_id, exc)
        report_evaluation_failure(settings, req, f"{type(exc).__name__}: {exc}", publish_event)
        raise
