"""What the admin CLI does, as plain functions over settings (the CLI formats their results;
the demo and the tests call them directly)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schema.events import EvaluateRequest, TrainRequest
from schema.models import (
    Client,
    Evaluation,
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    Round,
    RoundStatus,
    SimilarityEdge,
    Update,
    UpdateStatus,
    utcnow,
)
from services.client_data import ClientDataError, load_examples, task_kind
from services.context import object_store
from services.db import AGGREGATOR_LOCK, exclusive, session_scope
from services.object_store import ObjectNotFound
from services.s3_policy import write_client_policy
from services.settings import Settings
from services.signing import (
    SigningError,
    add_secret,
    new_private_key,
    pending_entry,
    public_key,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# what `train` reports as a round's problems
PROBLEMS = (UpdateStatus.FAILED, UpdateStatus.REJECTED, UpdateStatus.QUARANTINED)


class OperationError(Exception):
    """A refusal the CLI shows as is (no traceback)."""


# --- clients ---------------------------------------------------------------------------
def enroll(
    settings: Settings,
    name: str,
    data: str | Path,
    *,
    test: str | Path | None = None,
    task: str = "",
    site: str = "default",
) -> dict[str, Any]:
    """Check the client's data files, then add its row with a new key pair whose private key
    goes to the keys file here. Nothing is written on refusal. (Across organisations the
    site makes the key and checks the data itself: site_enroll, then enroll_request.)"""
    summary = check_enrollment(settings, name, data, test=test, task=task, site=site)
    key = new_private_key()
    row = _add_client(settings, summary, public_key(key), key)
    return {**row, "private_key": key, "keys_file": str(settings.client_secrets_path)}


def check_enrollment(
    settings: Settings,
    name: str,
    data: str | Path,
    *,
    test: str | Path | None = None,
    task: str = "",
    site: str = "default",
) -> dict[str, Any]:
    """What the client's row records, from its checked data files (OperationError: why not)."""
    if not NAME_RE.match(name):
        raise OperationError(
            f"client name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not NAME_RE.match(site):
        raise OperationError(
            f"site {site!r} is not valid: use 1-64 letters, digits, '.', '_' or '-' "
            "(it names the site's queue)"
        )
    try:
        examples = load_examples(data)
        test_examples = load_examples(test) if test else []
        kinds = {task_kind(examples)} | ({task_kind(test_examples)} if test_examples else set())
    except ClientDataError as exc:
        raise OperationError(f"cannot enroll {name}: {exc}") from None
    if len(kinds) > 1:
        raise OperationError(f"cannot enroll {name}: training and test data are different kinds")
    if "generation" in kinds and settings.model_kind != "causal-lm":
        raise OperationError(
            f"cannot enroll {name}: its data is a generation task (no options), which needs "
            "a causal language model: set FEDVEC_MODEL_KIND=causal-lm and FEDVEC_MODEL_PATH"
        )
    return {
        "name": name,
        "task": task or Path(data).parent.name,
        "site": site,
        "data_path": str(Path(data).resolve()),
        "test_path": str(Path(test).resolve()) if test else None,
        "num_examples": len(examples),
        "num_test_examples": len(test_examples),
    }


def _add_client(
    settings: Settings, summary: dict[str, Any], public: str, private: str | None
) -> dict[str, Any]:
    """The client's row (and, with private, its key in the keys file here) in one step."""
    row = Client(**summary, public_key=public)
    name = summary["name"]
    try:
        with session_scope(settings.resolved_database_url) as s:
            s.add(row)
            s.flush()  # the id names the key in the site's file and the policy file
            # Written before the row commits: a failed write leaves no client without a
            # key; a failed commit leaves an unused entry that the next enrollment of that
            # id overwrites.
            if private is not None:
                add_secret(settings.client_secrets_path, row.id, private)
            policy = (
                write_client_policy(
                    settings.home_path / "policies", settings.object_store_url, row.id
                )
                if settings.object_store_url.startswith("s3://")
                else None
            )
    except IntegrityError:
        raise OperationError(f"a client named {name!r} is already enrolled") from None
    except (OSError, SigningError) as exc:
        raise OperationError(f"cannot enroll {name}: {exc}") from None
    return {**client_dict(row), "policy_file": str(policy) if policy else None}


# --- enrollment across organisations: the site keeps its key and its data --------------
REQUEST_FORMAT = "fedvec-enrollment-request/1"
REQUEST_FIELDS = {
    "format": str,
    "name": str,
    "task": str,
    "site": str,
    "data_path": str,
    "test_path": (str, type(None)),
    "num_examples": int,
    "num_test_examples": int,
    "public_key": str,
}


def site_enroll(
    settings: Settings,
    name: str,
    data: str | Path,
    *,
    test: str | Path | None = None,
    task: str = "",
    site: str = "default",
) -> dict[str, Any]:
    """At the site, with no server credentials: check the data, make the client's key pair,
    file the private key in the site's keys file (under its name until the admin enrolls
    it) and return the request the admin enrolls, which holds the public key and a summary
    of the data, never the data or the private key."""
    summary = check_enrollment(settings, name, data, test=test, task=task, site=site)
    key = new_private_key()
    try:
        add_secret(settings.client_secrets_path, pending_entry(name), key)
    except (OSError, SigningError) as exc:
        raise OperationError(f"cannot prepare {name}: {exc}") from None
    return {"format": REQUEST_FORMAT, **summary, "public_key": public_key(key)}


def read_request(path: str | Path) -> dict[str, Any]:
    """A site's enrollment request, checked field by field (OperationError: which one)."""
    try:
        request = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OperationError(f"cannot read the enrollment request {path}: {exc}") from None
    if not isinstance(request, dict) or request.get("format") != REQUEST_FORMAT:
        raise OperationError(
            f"{path} is not an enrollment request (`fedvec site-enroll` writes one)"
        )
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    missing = sorted(set(REQUEST_FIELDS) - set(request))
    if unknown or missing:
        raise OperationError(f"enrollment request {path}: missing {missing}, unknown {unknown}")
    for field_name, kind in REQUEST_FIELDS.items():
        value = request[field_name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise OperationError(f"enrollment request {path}: {field_name} has the wrong type")
    for field_name in ("name", "site"):
        if not NAME_RE.match(request[field_name]):
            raise OperationError(f"enrollment request {path}: {field_name} is not valid")
    if request["num_examples"] < 1 or request["num_test_examples"] < 0:
        raise OperationError(f"enrollment request {path}: the data summary is not valid")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(request["public_key"]))
    except ValueError:
        raise OperationError(
            f"enrollment request {path}: public_key is not an Ed25519 public key (hex)"
        ) from None
    return request


def enroll_request(settings: Settings, path: str | Path) -> dict[str, Any]:
    """At the admin: record the client a site's request describes, with its public key. The
    data is not read here (it stays at the site, which checked it); no private key is made
    or seen."""
    request = read_request(path)
    public = request.pop("public_key")
    request.pop("format")
    return {**_add_client(settings, request, public, None), "private_key": None}


def rotate_key(settings: Settings, client: Client) -> dict[str, Any]:
    """A new key pair for the client: the private key replaces its entry in the keys file
    (deliver it to the client's site), the public key replaces the database's, and an HMAC
    client leaves HMAC for good. Updates signed with the old key are refused from then on."""
    key = new_private_key()
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(Client, client.id)
        if row is None:
            raise OperationError(f"unknown client {client.name!r}")
        row.public_key, row.secret_hash = public_key(key), None
        s.flush()
        try:  # the file first: a failed write leaves the old key in force
            add_secret(settings.client_secrets_path, row.id, key)
        except (OSError, SigningError) as exc:
            raise OperationError(f"cannot rotate the key of {row.name}: {exc}") from None
        out = client_dict(row)
    return {**out, "private_key": key, "keys_file": str(settings.client_secrets_path)}


def client_dict(c: Client) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "task": c.task,
        "site": c.site,
        "num_examples": c.num_examples,
        "num_test_examples": c.num_test_examples,
        "data_path": c.data_path,
        "test_path": c.test_path,
        "signing": signing_scheme(c),
        "enrolled_at": c.enrolled_at.isoformat(),
        "removed_at": c.removed_at.isoformat() if c.removed_at else None,
    }


def signing_scheme(c: Client) -> str:
    """How the client's updates are signed: ed25519, hmac (until rotate-key) or none
    (enrolled before signing existed)."""
    return "ed25519" if c.public_key else "hmac" if c.secret_hash else "none"


def list_clients(settings: Settings, removed: bool = False) -> list[dict[str, Any]]:
    """Enrolled clients; removed ones too with removed."""
    query = select(Client) if removed else _active()
    with session_scope(settings.resolved_database_url) as s:
        return [client_dict(c) for c in s.scalars(query.order_by(Client.id))]


def _active() -> Any:
    """Clients not removed."""
    return select(Client).where(Client.removed_at.is_(None))


def resolve_clients(
    settings: Settings, names: Iterable[str], all_: bool = False, *, removed_ok: bool = False
) -> list[Client]:
    """Clients by name or id (a removed one only with removed_ok); all enrolled ones, not
    removed, with all_."""
    with session_scope(settings.resolved_database_url) as s:
        if all_:
            clients = list(s.scalars(_active().order_by(Client.id)))
            if not clients:
                raise OperationError("no clients are enrolled: run `fedvec enroll` first")
            return clients
        out = []
        for name in names:
            stmt = select(Client).where(Client.name == name)
            if name.isdigit():
                stmt = select(Client).where((Client.name == name) | (Client.id == int(name)))
            c = s.scalars(stmt).first()
            if c is None:
                raise OperationError(f"unknown client {name!r} (see `fedvec clients`)")
            if c.removed_at is not None and not removed_ok:
                raise OperationError(f"client {name!r} was removed on {c.removed_at:%Y-%m-%d}")
            out.append(c)
        if not out:
            raise OperationError("name at least one client, or use --all")
        return out


# --- training --------------------------------------------------------------------------
@dataclass(frozen=True)
class CurrentAdapter:
    version: int
    key: str
    sha256: str | None  # None: the shared initial adapter (its bytes are the workers')


def current_adapter(s: Session, client_id: int) -> CurrentAdapter:
    """The client's personalized adapter θ̄_i: its latest version, or the shared initial one."""
    row = s.scalars(
        select(PersonalizedAdapter)
        .where(PersonalizedAdapter.client_id == client_id)
        .order_by(PersonalizedAdapter.version.desc())
        .limit(1)
    ).first()
    if row is None:
        from services.adapter_store import INITIAL_ADAPTER_KEY  # imports torch: only here

        return CurrentAdapter(0, INITIAL_ADAPTER_KEY, None)
    return CurrentAdapter(row.version, row.key, row.sha256)


def _client(s: Session, client_id: int) -> Client:
    client = s.get(Client, client_id)
    if client is None:
        raise OperationError(f"unknown client id {client_id}")
    return client


def train_request(settings: Settings, client_id: int, round_id: int | None = None) -> TrainRequest:
    """What a worker needs to train the client, as the server has it now; recorded as a
    `requested` update, so that the aggregator takes reports only for updates it asked for."""
    with session_scope(settings.resolved_database_url) as s:
        client = _client(s, client_id)
        base = current_adapter(s, client_id)
        req = TrainRequest(
            client_id=client_id,
            client_name=client.name,
            data_path=client.data_path,
            base_version=base.version,
            base_key=base.key,
            base_sha256=base.sha256,
            signed=signing_scheme(client) != "none",
            round_id=round_id,
        )
        s.add(
            Update(
                uid=req.request_id,
                client_id=client_id,
                round_id=round_id,
                base_version=base.version,
                status=UpdateStatus.REQUESTED,
            )
        )
        return req


def evaluate_request(settings: Settings, client_id: int, max_examples: int = 0) -> EvaluateRequest:
    """What a worker needs to score the client's current personalized adapter."""
    with session_scope(settings.resolved_database_url) as s:
        client = _client(s, client_id)
        if not client.test_path:
            raise OperationError(f"client {client.name} was enrolled without a test split (--test)")
        base = current_adapter(s, client_id)
        return EvaluateRequest(
            client_id=client_id,
            client_name=client.name,
            test_path=client.test_path,
            base_version=base.version,
            base_key=base.key,
            base_sha256=base.sha256,
            signed=signing_scheme(client) != "none",
            max_examples=max_examples,
        )


def start_round(settings: Settings, clients: list[Client], send: Callable[..., Any]) -> int:
    with session_scope(settings.resolved_database_url) as s:
        rnd = Round(participants=[c.id for c in clients], strategy=settings.strategy)
        s.add(rnd)
        s.flush()
        round_id = rnd.id
    for i, c in enumerate(clients):
        try:
            send_train(send, train_request(settings, c.id, round_id), site=c.site)
        except Exception as exc:
            # the broker (or the database) went away mid-round: the requests not sent are
            # recorded failed, so the round completes with those that were (or, if none
            # was, at the aggregator's next recovery pass) instead of waiting for ever
            _not_sent(settings, round_id, clients[i:], f"not sent: {type(exc).__name__}: {exc}")
            raise
    return round_id


def _not_sent(settings: Settings, round_id: int, clients: list[Client], reason: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        ids = {c.id for c in clients}
        for row in s.scalars(
            select(Update).where(Update.round_id == round_id, Update.client_id.in_(ids))
        ):
            row.status, row.reason = UpdateStatus.FAILED, reason[:2000]
            ids.discard(row.client_id)
        for client_id in sorted(ids):
            s.add(
                Update(
                    uid=str(uuid.uuid4()),
                    client_id=client_id,
                    round_id=round_id,
                    base_version=-1,
                    status=UpdateStatus.FAILED,
                    reason=reason[:2000],
                )
            )


def send_train(send: Callable[..., Any], req: TrainRequest, *, site: str) -> None:
    """To the queue of the client's site: only workers there read its data."""
    from services.celery_app import TRAIN_TASK, train_queue

    send(TRAIN_TASK, args=[req.to_dict()], queue=train_queue(site))


@dataclass
class RoundProgress:
    round_id: int
    participants: int
    reported: int
    status: str


def round_progress(settings: Settings, round_id: int) -> RoundProgress:
    with session_scope(settings.resolved_database_url) as s:
        rnd = s.get(Round, round_id)
        if rnd is None:
            raise OperationError(f"unknown round {round_id}")
        reported = s.scalar(
            select(func.count(func.distinct(Update.client_id))).where(
                Update.round_id == round_id, Update.status != UpdateStatus.REQUESTED
            )
        )
        return RoundProgress(round_id, len(rnd.participants), int(reported or 0), rnd.status)


class QueueWatch:
    """Says once, within seconds, that no worker takes work off a queue: one that still
    holds at least the messages sent to it `after_s` seconds later. (Site workers run
    without Celery's remote control, so they cannot be pinged; the queue shows it.)"""

    def __init__(
        self, settings: Settings, sent: Counter[str], *, after_s: float = 20.0, show: bool = True
    ) -> None:
        self.settings, self.sent, self.after_s, self.show = settings, sent, after_s, show
        self.t0 = time.monotonic()
        self.next_look = self.t0 + after_s
        self.idle: list[str] = []

    def look(self) -> None:
        if self.idle or not self.sent or time.monotonic() < self.next_look:
            return
        from services.celery_app import make_app, queue_depths

        self.next_look = time.monotonic() + 10.0
        depths = queue_depths(make_app(self.settings), sorted(self.sent))
        self.idle = [q for q, n in sorted(self.sent.items()) if (depths.get(q) or 0) >= n]
        if self.idle and self.show:
            waited = time.monotonic() - self.t0
            print(
                f"no worker has taken a task from {', '.join(map(repr, self.idle))} in "
                f"{waited:.0f}s: is `fedvec worker` (with --site SITE for queue train.SITE) "
                "running and connected to this broker? Still waiting.",
                file=sys.stderr,
                flush=True,
            )


def wait_for(
    check: Callable[[], tuple[bool, int]],
    *,
    total: int,
    timeout: float,
    desc: str,
    show: bool = True,
    poll: float = 0.2,
) -> None:
    """Poll `check` (done, count) with a progress bar (on a terminal; else a line per step)
    until done or timeout."""
    from services.console import Progress, interrupt_between_steps

    deadline = time.monotonic() + timeout
    with Progress(total, desc, show=show) as bar, interrupt_between_steps() as interrupted:
        while True:
            interrupted()  # Ctrl-C: raised here, between two looks
            done, count = check()
            bar.update_to(count)
            if done:
                return
            if time.monotonic() > deadline:
                raise OperationError(
                    f"{desc}: timed out after {timeout:.0f}s ({count}/{total} done); "
                    "are `fedvec worker` and `fedvec aggregator` running? see `fedvec status`"
                )
            time.sleep(poll)


def wait_round(
    settings: Settings,
    round_id: int,
    *,
    timeout: float,
    show: bool = True,
    alive: Callable[[], None] | None = None,
) -> None:
    """Until the round is aggregated. `alive`: called at each look, it raises when the
    processes doing the work died (the caller started them), instead of the timeout."""

    from services.celery_app import train_queue

    with session_scope(settings.resolved_database_url) as s:
        rnd = s.get(Round, round_id)
        participants = rnd.participants if rnd is not None else []
        sites = s.scalars(select(Client.site).where(Client.id.in_(participants))).all()
    watch = QueueWatch(settings, Counter(train_queue(site) for site in sites), show=show)

    def check() -> tuple[bool, int]:
        if alive is not None:
            alive()
        watch.look()
        p = round_progress(settings, round_id)
        return p.status == RoundStatus.AGGREGATED, p.reported

    total = round_progress(settings, round_id).participants
    wait_for(check, total=total, timeout=timeout, desc=f"round {round_id}", show=show)


def round_summary(settings: Settings, round_id: int) -> dict[str, Any]:
    with session_scope(settings.resolved_database_url) as s:
        updates = s.scalars(select(Update).where(Update.round_id == round_id)).all()
        names = dict(s.execute(select(Client.id, Client.name)).tuples().all())
        return {
            "round": round_id,
            "updates": dict(Counter(u.status for u in updates)),
            "failed": [
                {
                    "client_id": u.client_id,
                    "client": names.get(u.client_id),
                    "update": u.uid,
                    "status": u.status,
                    "reason": u.reason,
                }
                for u in updates
                if u.status in PROBLEMS
            ],
        }


def count_phrase(counts: dict[str, int]) -> str:
    """{"aggregated": 3, "failed": 1} -> "3 aggregated, 1 failed" ("none" when empty)."""
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "none"


def describe_round(summary: dict[str, Any]) -> str:
    """A round's outcome for people: its counts, then a line per update that failed or was
    refused, with the reason."""
    lines = [f"round {summary['round']}: {count_phrase(summary['updates'])}"]
    for f in summary["failed"]:
        lines.append(
            f"  {f['status']}: client {f['client'] or f['client_id']} update {f['update']}: "
            f"{f['reason'] or 'no reason recorded'}"
        )
    return "\n".join(lines)


# --- evaluation ------------------------------------------------------------------------
def evaluate(
    settings: Settings,
    clients: list[Client],
    send: Callable[..., Any],
    *,
    max_examples: int = 0,
    timeout: float = 600,
    show: bool = True,
    alive: Callable[[], None] | None = None,
    failures_ok: bool = False,
) -> list[dict[str, Any]]:
    """Score each client's current adapter on the workers; `alive` as for wait_round. An
    evaluation the worker could not do raises OperationError with its reason, unless
    failures_ok (then its row has `reason` set and no scores)."""
    from services.celery_app import EVALUATE_TASK, train_queue

    missing = [c.name for c in clients if not c.test_path]
    if missing:
        raise OperationError(f"clients enrolled without --test cannot be evaluated: {missing}")
    requests = [evaluate_request(settings, c.id, max_examples) for c in clients]
    for c, r in zip(clients, requests, strict=True):
        send(EVALUATE_TASK, args=[r.to_dict()], queue=train_queue(c.site))
    uids = [r.request_id for r in requests]
    watch = QueueWatch(settings, Counter(train_queue(c.site) for c in clients), show=show)

    def done() -> tuple[bool, int]:
        if alive is not None:
            alive()
        watch.look()
        with session_scope(settings.resolved_database_url) as s:
            n = s.scalar(
                select(func.count()).select_from(Evaluation).where(Evaluation.uid.in_(uids))
            )
        return n == len(uids), int(n or 0)

    wait_for(done, total=len(uids), timeout=timeout, desc="evaluating", show=show)
    names = {c.id: c.name for c in clients}
    with session_scope(settings.resolved_database_url) as s:
        rows = sorted(
            (
                {
                    "client": names[e.client_id],
                    "client_id": e.client_id,
                    "adapter_version": e.adapter_version,
                    "accuracy": e.accuracy,
                    "balanced_accuracy": e.balanced_accuracy,
                    "loss": e.loss,
                    "num_examples": e.num_examples,
                    "reason": e.reason,  # set when the worker could not score it
                }
                for e in s.scalars(select(Evaluation).where(Evaluation.uid.in_(uids)))
            ),
            key=lambda d: d["client_id"],
        )
    failed = [f"{r['client']}: {r['reason']}" for r in rows if r["reason"] is not None]
    if failed and not failures_ok:
        raise OperationError("evaluation failed for " + "; ".join(failed))
    return rows


# --- groups and status -----------------------------------------------------------------
def groups(settings: Settings) -> dict[str, Any]:
    with session_scope(settings.resolved_database_url) as s:
        latest = s.scalars(select(Grouping).order_by(Grouping.version.desc()).limit(1)).first()
        if latest is None:
            return {"version": None, "groups": [], "outside": []}
        names = dict(
            s.execute(select(Client.id, Client.name).where(Client.removed_at.is_(None)))
            .tuples()
            .all()
        )
        members = [
            m
            for m in s.scalars(select(GroupMember).where(GroupMember.version == latest.version))
            if m.client_id in names  # a client removed since leaves at the next regrouping
        ]
        by_group: dict[int, list[str]] = {}
        for m in members:
            by_group.setdefault(m.group_index, []).append(names.get(m.client_id, str(m.client_id)))
        grouped = {m.client_id for m in members}
        outside = []
        for cid in sorted(set(names) - grouped):
            last = s.scalars(
                select(Update).where(Update.client_id == cid).order_by(Update.id.desc()).limit(1)
            ).first()
            why = (
                "no update yet"
                if last is None
                else f"last update {last.status}" + (f": {last.reason}" if last.reason else "")
            )
            outside.append({"client": names[cid], "why": why})
        return {
            "version": latest.version,
            "strategy": latest.strategy,
            "threshold": latest.threshold,
            "created_at": latest.created_at.isoformat(),
            "groups": [{"group": g, "clients": sorted(v)} for g, v in sorted(by_group.items())],
            # enrolled clients in no group, and why (a client whose update was found unusable
            # leaves its group at the next regrouping)
            "outside": outside,
        }


def group_of(settings: Settings) -> dict[str, int]:
    """client name -> group index in the latest grouping."""
    return {c: g["group"] for g in groups(settings)["groups"] for c in g["clients"]}


def status(settings: Settings, queue_depths: dict[str, int | None] | None = None) -> dict[str, Any]:
    with session_scope(settings.resolved_database_url) as s:
        clients = list(s.scalars(_active().order_by(Client.id)))
        rows = []
        for c in clients:
            last = s.scalars(
                select(Update).where(Update.client_id == c.id).order_by(Update.id.desc()).limit(1)
            ).first()
            version = s.scalar(
                select(func.max(PersonalizedAdapter.version)).where(
                    PersonalizedAdapter.client_id == c.id
                )
            )
            rows.append(
                {
                    "client": c.name,
                    "site": c.site,
                    "personalized_version": int(version or 0),
                    "last_update": None
                    if last is None
                    else {
                        "uid": last.uid,
                        "status": last.status,
                        "round": last.round_id,
                        "at": last.created_at.isoformat(),
                        "loss": last.train_loss,
                        "reason": last.reason,
                    },
                }
            )
        counts = dict(
            s.execute(select(Update.status, func.count()).group_by(Update.status)).tuples().all()
        )
        last_round = s.scalars(select(Round).order_by(Round.id.desc()).limit(1)).first()
    return {
        "strategy": settings.strategy,
        "clients": rows,
        "updates": counts,
        "last_round": None
        if last_round is None
        else {"id": last_round.id, "status": last_round.status},
        "groups": groups(settings),
        "queues": queue_depths or {},
    }


# --- export ----------------------------------------------------------------------------
def export_adapter(
    settings: Settings, client: Client, out_dir: Path, version: int | None = None
) -> dict[str, Any]:
    from services import adapter_store as ads  # imports torch: only here

    store = object_store(settings)
    limit = settings.max_adapter_bytes
    with session_scope(settings.resolved_database_url) as s:
        stmt = select(PersonalizedAdapter).where(PersonalizedAdapter.client_id == client.id)
        if version is not None:
            stmt = stmt.where(PersonalizedAdapter.version == version)
        row = s.scalars(stmt.order_by(PersonalizedAdapter.version.desc()).limit(1)).first()
    if row is None and version not in (None, 0):
        raise OperationError(f"client {client.name} has no personalized adapter version {version}")
    if not object_store(settings).exists(ads.ADAPTER_CONFIG_KEY):
        raise OperationError("no adapter exists yet: train at least once (`fedvec train`)")
    if row is None:
        state = ads.get_state(store, ads.INITIAL_ADAPTER_KEY, max_bytes=limit)
        version = 0
    else:
        state = ads.get_state(store, row.key, max_bytes=limit, expected_sha256=row.sha256)
        version = row.version
    config = json.loads(store.get(ads.ADAPTER_CONFIG_KEY))
    ads.write_peft_folder(out_dir, state, config)
    return {"client": client.name, "version": version, "path": str(out_dir.resolve())}


# --- client lifecycle: remove, versions, roll back ---------------------------------------
def remove_client(settings: Settings, client: Client, delete_objects: bool) -> dict[str, Any]:
    """Remove a client in one transaction: its keys are cleared (its reports are refused from
    then on), its train requests in flight fail (their rounds complete without it), its
    accepted updates are withdrawn from every aggregate, and its similarity edges go. The
    row and its history stay. Objects are kept unless delete_objects; their deletion comes
    after the commit and can be run again (`fedvec remove --delete-objects` on a removed
    client finishes it), so nothing is left half-removed in the database."""
    db = settings.resolved_database_url
    counts: Counter[str] = Counter()
    with exclusive(db, AGGREGATOR_LOCK), session_scope(db) as s:
        row = s.get(Client, client.id)
        if row is None:
            raise OperationError(f"unknown client {client.name!r}")
        already = row.removed_at is not None
        if not already:
            row.removed_at = utcnow()
            row.public_key = row.secret_hash = None
            for u in s.scalars(select(Update).where(Update.client_id == row.id)):
                if u.status == UpdateStatus.REQUESTED:
                    u.status, u.reason = UpdateStatus.FAILED, "client removed"
                elif u.status in (UpdateStatus.STORED, UpdateStatus.AGGREGATED):
                    u.status, u.reason = UpdateStatus.WITHDRAWN, "client removed"
                else:
                    continue
                counts[u.status] += 1
            s.execute(
                delete(SimilarityEdge).where(
                    (SimilarityEdge.client_id == row.id) | (SimilarityEdge.peer_id == row.id)
                )
            )
        out = client_dict(row)
    (settings.home_path / "policies" / f"client-{client.id}.json").unlink(missing_ok=True)
    deleted = 0
    if delete_objects:
        store = object_store(settings)
        for key in store.list(f"clients/{client.id}/"):
            store.delete(key)
            deleted += 1
    return {
        **out,
        "already_removed": already,
        "requests_failed": counts[UpdateStatus.FAILED],
        "updates_withdrawn": counts[UpdateStatus.WITHDRAWN],
        "objects_deleted": deleted if delete_objects else None,
    }


def versions(settings: Settings, client: Client) -> list[dict[str, Any]]:
    """The client's personalized adapter versions, oldest first (0: the initial adapter)."""
    with session_scope(settings.resolved_database_url) as s:
        rows = s.scalars(
            select(PersonalizedAdapter)
            .where(PersonalizedAdapter.client_id == client.id)
            .order_by(PersonalizedAdapter.version)
        )
        return [
            {
                "version": r.version,
                "strategy": r.strategy,
                "updates": len(r.sources.get("updates", [])),
                "rollback_to": r.sources.get("rollback_to"),
                "sha256": r.sha256,
                "created_at": r.created_at.isoformat(),
            }
            for r in rows
        ]


def rollback(settings: Settings, client: Client, to_version: int) -> dict[str, Any]:
    """Publish a copy of an earlier personalized version as the client's newest one. History
    only grows (a worker that trained from the bad version is still recognised as such);
    the client's next training starts from the copy. The copied adapter is read and its
    sha256 checked first: a lost or corrupt version is refused, nothing written."""
    from services import adapter_store as ads  # imports torch: only here

    db, store = settings.resolved_database_url, object_store(settings)
    with exclusive(db, AGGREGATOR_LOCK), session_scope(db) as s:
        latest = s.scalars(
            select(PersonalizedAdapter)
            .where(PersonalizedAdapter.client_id == client.id)
            .order_by(PersonalizedAdapter.version.desc())
            .limit(1)
        ).first()
        if latest is None:
            raise OperationError(f"client {client.name} has no personalized adapter yet")
        if not 0 <= to_version < latest.version:
            raise OperationError(
                f"client {client.name} is at version {latest.version}: roll back to one of "
                f"0..{latest.version - 1} (`fedvec versions {client.name}`)"
            )
        watermark = 0  # the highest update id in the copy: newer peers' updates apply again
        if to_version == 0:
            key = ads.INITIAL_ADAPTER_KEY
            sha = ads.sha256(store.get_bounded(key, settings.max_adapter_bytes))
        else:
            old = s.scalars(
                select(PersonalizedAdapter).where(
                    PersonalizedAdapter.client_id == client.id,
                    PersonalizedAdapter.version == to_version,
                )
            ).one()
            key, sha = old.key, old.sha256
            watermark = int(old.sources.get("watermark", 0))
        try:
            ads.get_state(store, key, max_bytes=settings.max_adapter_bytes, expected_sha256=sha)
        except (ads.InvalidAdapter, ObjectNotFound) as exc:
            raise OperationError(
                f"cannot roll {client.name} back to version {to_version}: {exc}"
            ) from None
        new = PersonalizedAdapter(
            client_id=client.id,
            version=latest.version + 1,
            key=key,
            sha256=sha,
            strategy="rollback",
            sources={"watermark": watermark, "updates": [], "rollback_to": to_version},
            trigger_update_id=latest.trigger_update_id,
        )
        s.add(new)
        s.flush()
        return {"client": client.name, "version": new.version, "copy_of": to_version}


# --- a FLAN-format folder --------------------------------------------------------------
def enroll_flan(
    settings: Settings,
    data_dir: str | Path,
    *,
    site: str = "default",
    shards: int = 1,
    test_per_client: int | None = None,
) -> dict[str, Any]:
    """Enroll every multiple-choice client of a FLAN folder (train_client_K.json, any K, and
    test.jsonl): each gets its records as train.jsonl and its task's test records as
    test.jsonl under FEDVEC_HOME/data/<folder>/<client>/. Every file is checked, and no
    name is taken, before the first client is enrolled."""
    from services.flan_data import build_flan_clients  # reads and writes files: only here

    source = Path(data_dir).expanduser().resolve()
    out = settings.home_path / "data" / source.name
    out.mkdir(parents=True, exist_ok=True)
    # written beside, then moved in: a refusal leaves the files of enrolled clients as they are
    with tempfile.TemporaryDirectory(dir=out, prefix=".new-") as tmp:
        try:
            built = build_flan_clients(source, tmp, shards=shards, test_per_client=test_per_client)
        except (FileNotFoundError, ClientDataError, ValueError) as exc:
            raise OperationError(f"cannot enroll {source}: {exc}") from None
        names = [c.name for c in built.clients]
        if not names:
            raise OperationError(f"{source} has no multiple-choice client to enroll")
        with session_scope(settings.resolved_database_url) as s:
            taken = sorted(s.scalars(select(Client.name).where(Client.name.in_(names))))
        if taken:
            raise OperationError(
                f"already enrolled: {', '.join(taken)}; nothing enrolled (remove them first, "
                "or enroll another copy of the folder under another name)"
            )
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)  # left by a client never enrolled
            os.replace(Path(tmp) / name, out / name)
    rows = []
    for c in built.clients:
        train, test = out / c.name / "train.jsonl", out / c.name / "test.jsonl"
        row = enroll(settings, c.name, train, test=test, task=c.task, site=site)
        rows.append({k: v for k, v in row.items() if k != "private_key"})
    return {
        "data_dir": str(source),
        "written_to": str(out),
        "clients": rows,
        "left_out": built.left_out,
        "keys_file": str(settings.client_secrets_path),
    }
