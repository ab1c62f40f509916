"""The aggregator's reads and writes of update and round rows: which updates are current, and
the status changes other than publishing (reject, quarantine, supersede, finish a round).
Plain functions; the in-memory parts (loader cache, screening, sketch index) are told about
a change by the caller (aggregator/service.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aggregator import outliers
from schema.models import Round, RoundStatus, Update, UpdateStatus
from services import metrics
from services.db import session_scope

log = logging.getLogger(__name__)

# statuses of an update that may enter aggregates
ACCEPTED = (UpdateStatus.STORED, UpdateStatus.AGGREGATED)
# statuses with which a round's participant has reported (a round completes when all have);
# `superseded` is only ever set on asynchronous updates
REPORTED = (
    UpdateStatus.STORED,
    UpdateStatus.AGGREGATED,
    UpdateStatus.REJECTED,
    UpdateStatus.QUARANTINED,
    UpdateStatus.FAILED,
)


# --- reads ------------------------------------------------------------------------------
def latest_accepted(s: Session, ids: list[int] | None = None) -> list[Update]:
    """The latest accepted update of every client, by client id (ids: only these updates)."""
    newest = (
        select(func.max(Update.id)).where(Update.status.in_(ACCEPTED)).group_by(Update.client_id)
    )
    query = select(Update).where(Update.id.in_(newest if ids is None else ids))
    return list(s.scalars(query.order_by(Update.client_id)))


def latest_accepted_ids(s: Session) -> dict[int, int]:
    """Client id -> id of its latest accepted update (ids only, no rows)."""
    return dict(
        s.execute(
            select(Update.client_id, func.max(Update.id))
            .where(Update.status.in_(ACCEPTED))
            .group_by(Update.client_id)
        )
        .tuples()
        .all()
    )


def newer_aggregated(s: Session, update: Update) -> Update | None:
    """The newest aggregated update of `update`'s client that is newer than it, if any."""
    return s.scalars(
        select(Update)
        .where(
            Update.client_id == update.client_id,
            Update.status == UpdateStatus.AGGREGATED,
            Update.id > update.id,
        )
        .order_by(Update.id.desc())
        .limit(1)
    ).first()


def round_complete(db_url: str, round_id: int) -> bool:
    """Every participant of a round still training has reported."""
    with session_scope(db_url) as s:
        rnd = s.get(Round, round_id)
        if rnd is None or rnd.status != RoundStatus.TRAINING:
            return False
        reported = set(
            s.scalars(
                select(Update.client_id).where(
                    Update.round_id == round_id, Update.status.in_(REPORTED)
                )
            )
        )
        return set(rnd.participants) <= reported


def round_targets(db_url: str, round_id: int) -> list[int]:
    """Clients with a stored update in the round: those that get a new adapter."""
    with session_scope(db_url) as s:
        return sorted(
            set(
                s.scalars(
                    select(Update.client_id).where(
                        Update.round_id == round_id, Update.status == UpdateStatus.STORED
                    )
                )
            )
        )


# --- status changes -----------------------------------------------------------------------
def reject(db_url: str, update: Update, reason: str, label: str) -> None:
    """An unusable update (label: bounded metric label) becomes `rejected`: a stored one, or
    an aggregated one found unusable later (its file corrupted or lost since, read again
    after a restart), so that `status` and `groups` say why its client left its group."""
    with session_scope(db_url) as s:
        row = s.get(Update, update.id)
        if row is None or row.status not in (UpdateStatus.STORED, UpdateStatus.AGGREGATED):
            return
        if row.status == UpdateStatus.AGGREGATED:
            reason = f"found unusable after it was aggregated: {reason}"
        row.status = UpdateStatus.REJECTED
        row.reason = reason[:2000]
    log.warning("client=%s update=%s rejected: %s", update.client_id, update.uid, reason)
    metrics.UPDATES_REJECTED.labels(reason=label).inc()


def quarantine(db_url: str, update: Update, found: outliers.Outlier) -> None:
    """A screened-out update becomes `quarantined`, with the reason on its row."""
    log.warning(
        "client=%s update=%s (id %s) quarantined, %s: %s",
        update.client_id,
        update.uid,
        update.id,
        found.reason,
        found.message,
    )
    with session_scope(db_url) as s:
        row = s.get(Update, update.id)
        if row is not None and row.status == UpdateStatus.STORED:
            row.status = UpdateStatus.QUARANTINED
            row.reason = f"{found.reason}: {found.message}"[:2000]
    metrics.UPDATES_QUARANTINED.labels(reason=found.reason).inc()


def supersede_older(s: Session, newer: Update) -> list[int]:
    """Asynchronous updates of `newer`'s client still `stored` but older than it (it is
    aggregated) become `superseded`: its aggregate already used it in their place, so
    aggregating them would step the client back in time, and left `stored` every
    recovery pass would handle them again. Returns their ids."""
    older = list(
        s.scalars(
            select(Update).where(
                Update.client_id == newer.client_id,
                Update.status == UpdateStatus.STORED,
                Update.round_id.is_(None),
                Update.id < newer.id,
            )
        )
    )
    for row in older:
        log.info("client=%s update=%s superseded by update=%s", row.client_id, row.uid, newer.uid)
        row.status = UpdateStatus.SUPERSEDED
        row.reason = f"superseded by update {newer.uid}, aggregated before it"
    return [row.id for row in older]


def finish_round(s: Session, round_id: int) -> None:
    rnd = s.get(Round, round_id)
    if rnd is not None:
        if rnd.status != RoundStatus.AGGREGATED:
            metrics.ROUNDS_COMPLETED.inc()
        rnd.status = RoundStatus.AGGREGATED
        rnd.aggregated_at = datetime.now(UTC)
