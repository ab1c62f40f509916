"""The event-driven aggregator: consumes the workers' reports (`update.reported`,
`update.failed`, `evaluation.reported`, checked and recorded by aggregator/intake.py) and
`update.stored` (the server side's own: recovery, benchmarks), validates task vectors,
keeps the similarity edges and groups, and publishes personalized adapters.

One consumer handles the aggregate queue, so regrouping is serialized. Each event is
idempotent: it is recorded in `processed_events`, an update is aggregated only while its
status is `stored`, and new personalized adapters are written to the object store under
their (client, version) key before the one transaction that references them commits.

When does a client get a new θ̄_i? In synchronous mode (updates carry a round), when every
participant of the round has reported; in asynchronous mode (no round), at each update of
that client. The same rule picks what goes into it: the client's own fresh update and the
peers' latest updates that are newer than what its previous θ̄_i already contained.

Before an update can enter any aggregate it is screened against the other clients' latest
accepted updates (aggregator/screening.py): one with a norm far above theirs, or a
sign-flipped copy of one of them, is `quarantined` — kept with the reason on its row, never
aggregated, counted in fedvec_updates_quarantined_total; its client keeps its adapter.

The parts, each owning its own state: intake.py (reports checked against the request and
the client's key, then recorded), loader.py (τ, θ read and verified, their cache),
screening.py (the one screening policy), peer_index.py (the sketch index, with
FEDVEC_AGGREGATE_PEERS), records.py (update and round rows: reject, quarantine, supersede),
publish.py (personalized adapters, similarity edges, groups, the commit). This class drives
them: event intake, aggregation, recovery.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregator import outliers, records
from aggregator.intake import Intake, Refused
from aggregator.loader import Loaded, UpdateLoader
from aggregator.peer_index import PeerIndex
from aggregator.publish import Current, Publisher, current_adapters
from aggregator.screening import Screening
from aggregator.similarity import cosine_matrix
from aggregator.strategies import Contribution, Strategy, get_strategy
from aggregator.task_vectors import flatten
from schema.events import (
    EvaluationReported,
    Event,
    InvalidMessage,
    UpdateFailed,
    UpdateStored,
    parse_event,
)
from schema.models import ProcessedEvent, Round, RoundStatus, Update, UpdateStatus
from services import adapter_store as ads
from services import metrics
from services.context import object_store
from services.db import AGGREGATOR_LOCK, as_utc, exclusive, session_scope
from services.object_store import ObjectNotFound, ObjectTooLarge
from services.settings import Settings
from services.transient import is_transient

log = logging.getLogger(__name__)

LOCK = AGGREGATOR_LOCK  # one aggregator process at a time regroups


class Aggregator:
    def __init__(self, settings: Settings) -> None:
        outliers.check_settings(settings.outlier_norm_ratio, settings.outlier_flip_cosine)
        self.settings = settings
        self.db_url = settings.resolved_database_url
        self.store = object_store(settings)
        self.strategy: Strategy = get_strategy(
            settings.strategy,
            group_threshold=settings.group_threshold,
            staleness_exponent=settings.staleness_exponent,
            group_threshold_z=settings.group_threshold_z,
        )
        self.intake = Intake(settings, self.store, self.db_url)
        self.loader = UpdateLoader(settings, self.store, self.db_url)
        self.peers = PeerIndex(settings, self.loader)
        self.screening = Screening(settings, self.loader, self.peers, self.db_url)
        self.publisher = Publisher(settings, self.strategy, self.loader, self.store, self.db_url)

    # --- events -----------------------------------------------------------------------
    def handle(self, data: Any) -> str:
        """Process one event; returns what happened (for logs and tests)."""
        try:
            event = parse_event(data)
        except InvalidMessage as exc:
            said = data if isinstance(data, dict) else {}  # whatever ids it claims, for the log
            log.error(
                "refused malformed event client=%s update=%s: %s",
                said.get("client_id"),
                said.get("update_uid") or said.get("evaluation_uid"),
                exc,
            )
            metrics.EVENTS.labels(outcome="invalid").inc()
            return "invalid"
        t0 = time.perf_counter()
        uid = getattr(event, "update_uid", None) or getattr(event, "evaluation_uid", None)
        # Regrouping is serialized across aggregator processes, so two events handled at
        # once can never both read the same index and lose one update's effect.
        with exclusive(self.db_url, LOCK):
            with session_scope(self.db_url) as s:
                if s.get(ProcessedEvent, event.event_id) is not None:
                    log.info("event=%s update=%s duplicate, ignored", event.event_id, uid)
                    metrics.EVENTS.labels(outcome="duplicate").inc()
                    return "duplicate"
            try:
                outcome = self._handle(event)
            except Refused as exc:
                # nothing was written, not even the event's mark: a forged copy must not
                # shadow the genuine report
                log.error(
                    "event=%s %s client=%s update=%s refused (%s): %s",
                    event.event_id,
                    event.kind,
                    event.client_id,
                    uid,
                    exc.outcome,
                    exc,
                )
                metrics.REPORTS_REFUSED.labels(reason=exc.outcome).inc()
                metrics.EVENTS.labels(outcome=exc.outcome).inc()
                return exc.outcome
            with session_scope(self.db_url) as s:
                if s.get(ProcessedEvent, event.event_id) is None:
                    s.add(ProcessedEvent(event_id=event.event_id, kind=event.kind, outcome=outcome))
        metrics.EVENTS.labels(outcome=outcome).inc()
        log.info(
            "event=%s %s client=%s update=%s -> %s (%.3fs)",
            event.event_id,
            event.kind,
            event.client_id,
            uid,
            outcome,
            time.perf_counter() - t0,
        )
        return outcome

    def _handle(self, event: Event) -> str:
        if isinstance(event, EvaluationReported):
            return self.intake.record_evaluation(event)
        with session_scope(self.db_url) as s:
            update = s.scalars(select(Update).where(Update.uid == event.update_uid)).first()
            if update is None:  # no such request was recorded
                raise Refused("unknown-update", "no update of this id was requested")
            if update.client_id != event.client_id:
                raise Refused("mismatch", f"requested for client {update.client_id}")
            requested = update.status == UpdateStatus.REQUESTED
            if requested and isinstance(event, UpdateStored):
                return "not-reported"  # the worker's report has not come in
            if requested:
                update = self.intake.record_update(s, update, event)  # Refused: nothing written
            elif update.round_id != event.round_id:
                raise Refused("mismatch", f"requested in round {update.round_id}")
            status = update.status  # before superseding, which may change it
            overtaken = (
                not isinstance(event, UpdateFailed)
                and status == UpdateStatus.STORED
                and event.round_id is None
                and self._overtaken(s, update)
            )
        candidates: list[int] | None = None
        if isinstance(event, UpdateFailed):
            if not requested:
                return f"already-{status}"
            outcome = "failed"
        elif requested and status == UpdateStatus.REJECTED:  # intake found its sketch unusable
            outcome = "rejected"
        else:
            metrics.UPDATES_RECEIVED.inc()
            if status != UpdateStatus.STORED:
                return f"already-{status}"
            if overtaken:
                return "superseded"
            outcome, candidates = self._accept(update)
        if event.round_id is None:
            if outcome == "accepted":
                self.aggregate([update.client_id], round_id=None, candidates=candidates)
                return "aggregated"
            return outcome
        if records.round_complete(self.db_url, event.round_id):
            self.aggregate(
                records.round_targets(self.db_url, event.round_id), round_id=event.round_id
            )
            return "round-aggregated"
        return outcome

    def _overtaken(self, s: Session, update: Update) -> bool:
        """A newer update of the client was aggregated first: this one (and any other older
        stored one) is superseded, within the caller's transaction."""
        newer = records.newer_aggregated(s, update)
        if newer is None:
            return False
        superseded = records.supersede_older(s, newer)
        self.screening.forget(superseded)
        return len(superseded) > 0

    def _accept(self, update: Update) -> tuple[str, list[int] | None]:
        """Load, verify and screen a stored update: ("accepted", its aggregate candidates
        when screening searched them), ("rejected", None) or ("quarantined", None)."""
        if (pair := self.loader.usable(update)) is None:
            return "rejected", None
        found, candidates = self.screening.screen(update, pair[0])
        if found is not None:
            self._quarantine(update, found)
            return "quarantined", None
        return "accepted", candidates

    def _quarantine(self, update: Update, found: outliers.Outlier) -> None:
        records.quarantine(self.db_url, update, found)
        self.screening.forget([update.id])
        self.loader.cache.forget(update.id)  # never read again
        # out of the sketch index now, so that no later event takes it as someone's peer
        self.peers.drop(update)

    # --- aggregation ------------------------------------------------------------------
    def aggregate(
        self, targets: list[int], *, round_id: int | None, candidates: list[int] | None = None
    ) -> None:
        """Publish a new θ̄ for each target client whose own update is fresh (candidates:
        with aggregate_peers > 0, the update ids screening found for the one target)."""
        t0 = time.perf_counter()
        loaded, current = self._contributions(targets, candidates)
        loaded, cosines = self._screen_pending(loaded)
        if not loaded:
            self._finish_round(round_id)
            return
        contributions = [
            Contribution(
                client_id=x.update.client_id,
                task_vector=x.task_vector,
                trained=x.trained,
                num_examples=x.update.num_examples,
                staleness=max(
                    0, current.get(x.update.client_id, (0, 0))[0] - x.update.base_version
                ),
            )
            for x in loaded
        ]
        similarity = self.publisher.similarity(loaded, cosines)
        plan = self.strategy.plan(contributions, similarity)
        published, staleness_used = self.publisher.personalize(
            targets, loaded, contributions, plan, current
        )
        # with the sketch index, the groups stored are the whole population's
        sketch_groups = self.peers.groups() if self.settings.aggregate_peers > 0 else None
        done = self.publisher.commit(
            loaded, plan, similarity, cosines, published, targets, round_id, sketch_groups
        )
        self.screening.forget(done)  # `aggregated` now: trusted by status
        elapsed = time.perf_counter() - t0
        metrics.AGGREGATION_SECONDS.observe(elapsed)
        for staleness in staleness_used:
            metrics.UPDATE_STALENESS.observe(staleness)
        log.info(
            "aggregated round=%s: %d personalized adapters for clients %s, %d groups (%.2fs)",
            round_id,
            len(published),
            [c for c, _ in published],
            len(set(plan.groups)),
            elapsed,
        )

    def _contributions(
        self, targets: list[int], candidates: list[int] | None = None
    ) -> tuple[list[Loaded], Current]:
        """The latest accepted update of every client (with aggregate_peers = m > 0: of the
        targets and their m nearest clients by sketch, or the given candidates' update ids
        when screening just found them), loaded; plus, per client, its current
        personalized (version, watermark)."""
        with session_scope(self.db_url) as s:
            if candidates is not None:
                latest = records.latest_accepted(s, candidates)
            elif self.settings.aggregate_peers > 0:
                latest = records.latest_accepted(s, self.peers.nearest(s, targets)[0])
            else:
                latest = records.latest_accepted(s)
            current = current_adapters(s, [u.client_id for u in latest])
        loaded: list[Loaded] = []
        for update in latest:  # some may not be validated through their own event yet
            if (pair := self.loader.usable(update)) is not None:
                loaded.append(Loaded(update, *pair))
        return loaded, current

    def _screen_pending(self, loaded: list[Loaded]) -> tuple[list[Loaded], torch.Tensor]:
        """The aggregate's updates not screened yet are screened against the rest of it, and
        those flagged quarantined and left out. Returns what stays, with the exact cosines
        of its task vectors."""
        if not loaded:
            return loaded, torch.zeros((0, 0), dtype=torch.float64)
        vectors = torch.stack([flatten(x.task_vector) for x in loaded])
        cosines = cosine_matrix(vectors)
        flagged = self.screening.screen_pending(loaded, vectors, cosines)
        del vectors  # n × d: not kept through the rest of the aggregation
        for i, found in flagged.items():
            self._quarantine(loaded[i].update, found)
        if flagged:
            keep = [i for i in range(len(loaded)) if i not in flagged]
            loaded = [loaded[i] for i in keep]
            pick = torch.tensor(keep, dtype=torch.int64)
            cosines = cosines[pick][:, pick]
        return loaded, cosines

    def _finish_round(self, round_id: int | None) -> None:
        if round_id is not None:
            with session_scope(self.db_url) as s:
                records.finish_round(s, round_id)

    # --- recovery ---------------------------------------------------------------------
    def recover(self, older_than_s: float = 0.0) -> None:
        """Finish what a crash or a lost event left undone: complete rounds not aggregated,
        asynchronous updates stored but not aggregated. At start-up for everything; then
        every FEDVEC_RECOVER_INTERVAL for updates older than that, whose event will not come
        (lost with the broker, or its task gave up): the database, not the queue, says what
        is left to do."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        with session_scope(self.db_url) as s:
            open_rounds = list(
                s.scalars(select(Round.id).where(Round.status == RoundStatus.TRAINING))
            )
            query = select(Update).where(
                Update.status == UpdateStatus.STORED, Update.round_id.is_(None)
            )
            reported = select(Update).where(Update.status == UpdateStatus.REQUESTED)
            if older_than_s > 0:
                query = query.where(Update.created_at < cutoff)
                reported = reported.where(Update.created_at < cutoff)
            pending = list(s.scalars(query.order_by(Update.id)))
            requested = list(s.scalars(reported.order_by(Update.id)))
        with exclusive(self.db_url, LOCK):
            for round_id in open_rounds:
                if records.round_complete(self.db_url, round_id):
                    log.info("recovering round=%s", round_id)
                    self.aggregate(records.round_targets(self.db_url, round_id), round_id=round_id)
        # requests whose worker stored its report but whose event never came; those past
        # the deadline without one fail, so that their rounds complete
        late = datetime.now(UTC) - timedelta(seconds=self.settings.request_deadline)
        events = []
        for u in requested:
            report = self._stored_report(u)
            if (
                report is None
                and self.settings.request_deadline > 0
                and as_utc(u.created_at) < late
            ):
                reason = (
                    f"no report within FEDVEC_REQUEST_DEADLINE "
                    f"({self.settings.request_deadline:.0f} s): the request was lost or no "
                    "worker of its site took it"
                )
                report = UpdateFailed(u.uid, u.client_id, u.round_id, reason).to_dict()
            events.append((u, report))
        events += [(u, UpdateStored(u.uid, u.client_id, None).to_dict()) for u in pending]
        for update, event in events:  # handle() takes the lock itself
            if event is None:
                continue
            log.info("recovering client=%s update=%s", update.client_id, update.uid)
            try:
                self.handle(event)
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database or the store is away: the whole pass waits
                # one update that cannot be handled must not hold up the ones after it;
                # it stays as it is and is tried again at the next pass
                log.exception(
                    "client=%s update=%s could not be recovered: %s",
                    update.client_id,
                    update.uid,
                    exc,
                )

    def _stored_report(self, update: Update) -> Any | None:
        """The report a worker stored for a requested update (None: not stored yet)."""
        try:
            data = self.store.get_bounded(ads.report_key(update.client_id, update.uid), 1 << 16)
        except ObjectNotFound:
            return None
        except ObjectTooLarge:
            log.error("client=%s update=%s: its report is oversized", update.client_id, update.uid)
            return None
        try:
            return json.loads(bytes(data))
        except ValueError:
            return None  # handle() would refuse it; the worker's redelivery rewrites it
