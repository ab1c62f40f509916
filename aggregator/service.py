"""The event-driven aggregator: consumes `update.stored` / `update.failed`, validates task
vectors, keeps the similarity edges and groups, and publishes personalized adapters.

One consumer handles the aggregate queue, so regrouping is serialized. Each event is
idempotent: it is recorded in `processed_events`, an update is aggregated only while its
status is `stored`, and new personalized adapters are written to the object store under
their (client, version) key before the one transaction that references them commits.

When does a client get a new θ̄_i? In synchronous mode (updates carry a round), when every
participant of the round has reported; in asynchronous mode (no round), at each update of
that client. The same rule picks what goes into it: the client's own fresh update and the
peers' latest updates that are newer than what its previous θ̄_i already contained.

Before an update can enter any aggregate it is screened against the other clients' latest
accepted updates (aggregator/outliers.py): one with a norm far above theirs, or a
sign-flipped copy of one of them, is `quarantined` — kept with the reason on its row, never
aggregated, counted in fedvec_updates_quarantined_total; its client keeps its adapter.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import torch
from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.orm import Session, undefer

from aggregator import outliers
from aggregator.similarity import cosine_matrix, layerwise_cosine_matrices, smoothed_similarity
from aggregator.sketch import from_bytes as sketch_from_bytes
from aggregator.sketch import sketch_state_dict
from aggregator.sketch_index import IndexUpdate, SketchIndex
from aggregator.strategies import Contribution, Plan, Strategy, get_strategy
from aggregator.task_vectors import (
    InvalidTaskVector,
    StateDict,
    check_state_dict,
    flatten,
    shapes,
)
from schema.events import InvalidMessage, UpdateFailed, UpdateStored, parse_event
from schema.models import (
    Client,
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    ProcessedEvent,
    Round,
    SimilarityEdge,
    Update,
)
from services import adapter_store as ads
from services import metrics
from services.context import object_store
from services.db import as_utc, exclusive, session_scope
from services.object_store import ObjectNotFound
from services.settings import Settings
from services.signing import verify
from services.transient import is_transient

log = logging.getLogger(__name__)

ACCEPTED = ("stored", "aggregated")
CACHE_BYTES = 1 << 30  # loaded (τ, θ) pairs kept in memory


def _nbytes(sd: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# statuses with which a round's participant has reported (a round completes when all have)
REPORTED = ("stored", "aggregated", "rejected", "quarantined", "failed")


class RejectedUpdate(Exception):
    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.label = label  # bounded metric label


@dataclass
class Loaded:
    update: Update
    task_vector: StateDict
    trained: StateDict


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
        self._expected: dict[str, tuple[int, ...]] | None = None
        # update id -> (client id, τ, θ): task vectors are immutable, so caching them is
        # safe. One update per client, and bounded in bytes: at 7B-model adapter sizes a
        # few hundred pairs are already gigabytes.
        self._cache: OrderedDict[int, tuple[int, StateDict, StateDict]] = OrderedDict()
        self._cached_of: dict[int, int] = {}  # client id -> the update id cached for it
        self._cache_bytes = 0
        self._cache_limit = CACHE_BYTES
        # aggregate_peers > 0: sketches of every client's latest update, built from the
        # database at the first aggregation and kept up to date after it
        self._index: SketchIndex | None = None
        self._client_keys: dict[int, str | None] = {}  # client id -> signing key (hex)
        self._indexed: dict[int, int] = {}  # client id -> update id of its indexed sketch
        # (version, membership) of the grouping last read or written: not re-read from the
        # database per update (N rows)
        self._groups_seen: tuple[int, dict[int, int]] | None = None
        # ids of `stored` updates that passed screening in this process (dropped when they
        # are aggregated); `aggregated` ones passed it too. Only these are references for
        # the sign-flip check. After a restart, stored updates are screened again.
        self._screened: set[int] = set()

    # --- entry point ------------------------------------------------------------------
    def handle(self, data: Any) -> str:
        """Process one event; returns what happened (for logs and tests)."""
        try:
            event = parse_event(data)
        except InvalidMessage as exc:
            log.error("refused malformed event: %s", exc)
            metrics.EVENTS.labels(outcome="invalid").inc()
            return "invalid"
        t0 = time.perf_counter()
        # Regrouping is serialized across aggregator processes, so two events handled at
        # once can never both read the same index and lose one update's effect.
        with exclusive(self.db_url, "fedvec-aggregator"):
            with session_scope(self.db_url) as s:
                if s.get(ProcessedEvent, event.event_id) is not None:
                    log.info(
                        "event=%s update=%s duplicate, ignored", event.event_id, event.update_uid
                    )
                    metrics.EVENTS.labels(outcome="duplicate").inc()
                    return "duplicate"
            outcome = self._handle(event)
            with session_scope(self.db_url) as s:
                if s.get(ProcessedEvent, event.event_id) is None:
                    s.add(ProcessedEvent(event_id=event.event_id, kind=event.kind, outcome=outcome))
        metrics.EVENTS.labels(outcome=outcome).inc()
        log.info(
            "event=%s %s client=%s update=%s -> %s (%.3fs)",
            event.event_id,
            event.kind,
            event.client_id,
            event.update_uid,
            outcome,
            time.perf_counter() - t0,
        )
        return outcome

    def _handle(self, event: UpdateStored | UpdateFailed) -> str:
        with session_scope(self.db_url) as s:
            update = s.scalars(select(Update).where(Update.uid == event.update_uid)).first()
            if update is None:
                log.error("update=%s unknown (client=%s)", event.update_uid, event.client_id)
                return "unknown-update"
            if update.client_id != event.client_id or update.round_id != event.round_id:
                log.error("update=%s: event does not match its row", event.update_uid)
                return "mismatch"
            status = update.status
            overtaken = False
            if isinstance(event, UpdateStored) and status == "stored" and event.round_id is None:
                # a newer update of the client aggregated first (within this transaction)
                newer = s.scalars(
                    select(Update)
                    .where(
                        Update.client_id == update.client_id,
                        Update.status == "aggregated",
                        Update.id > update.id,
                    )
                    .order_by(Update.id.desc())
                    .limit(1)
                ).first()
                if newer is not None:
                    overtaken = self._supersede_older(s, newer) > 0
        if isinstance(event, UpdateStored):
            metrics.UPDATES_RECEIVED.inc()
            if status != "stored":
                return f"already-{status}"
            if overtaken:
                return "superseded"
            candidates: list[int] | None = None
            try:
                tau, _ = self._load(update)
            except RejectedUpdate as exc:
                self._reject(update, exc)
                outcome = "rejected"
            else:
                found, candidates = self._screen(update, tau)
                if found is not None:
                    self._quarantine(update, found)
                    outcome = "quarantined"
                else:
                    outcome = "accepted"
        else:
            outcome = "failed"
        if event.round_id is None:
            if outcome == "accepted":
                self.aggregate([update.client_id], round_id=None, candidates=candidates)
                return "aggregated"
            return outcome
        if self._round_complete(event.round_id):
            self.aggregate(self._round_targets(event.round_id), round_id=event.round_id)
            return "round-aggregated"
        return outcome

    # --- validation -------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._expected is None:
            initial = ads.get_state(
                self.store, ads.INITIAL_ADAPTER_KEY, max_bytes=self.settings.max_adapter_bytes
            )
            self._expected = shapes(initial)
        return self._expected

    def _load(self, update: Update) -> tuple[StateDict, StateDict]:
        """τ and θ of an update, read and checked; RejectedUpdate if unusable."""
        if update.id in self._cache:
            self._cache.move_to_end(update.id)
            _, tau, theta = self._cache[update.id]
            return tau, theta
        self._check_signature(update)  # before any of its bytes are read
        limit = self.settings.max_adapter_bytes
        try:
            tau = ads.get_state(
                self.store,
                update.task_vector_key,
                max_bytes=limit,
                expected_sha256=update.task_vector_sha256,
            )
            theta = ads.get_state(
                self.store,
                update.adapter_key,
                max_bytes=limit,
                expected_sha256=update.adapter_sha256,
            )
        except ads.InvalidAdapter as exc:
            raise RejectedUpdate(str(exc), "invalid_file") from None
        except ObjectNotFound as exc:
            raise RejectedUpdate(f"object missing: {exc}", "missing_object") from None
        try:
            # workers store adapters and task vectors as float32 (services/adapter_store.py)
            check_state_dict(tau, self.expected_shapes(), torch.float32)
            check_state_dict(theta, self.expected_shapes(), torch.float32)
        except InvalidTaskVector as exc:
            label = "non_finite" if ("NaN" in str(exc) or "Inf" in str(exc)) else "invalid_tensor"
            raise RejectedUpdate(str(exc), label) from None
        self._remember(update, (tau, theta))
        return tau, theta

    def _remember(self, update: Update, pair: tuple[StateDict, StateDict]) -> None:
        """Cache an update's (τ, θ), one update per client: aggregates read each client's
        latest accepted update, so a client's older one is dropped when a newer one is
        loaded (and an older one loaded after it is not kept). Otherwise a long-running
        aggregator's cache grows with every update until it reaches its byte limit."""
        held = self._cached_of.get(update.client_id)
        if held is not None and held > update.id:
            return
        if held is not None:
            self._forget(held)
        self._cache[update.id] = (update.client_id, *pair)
        self._cached_of[update.client_id] = update.id
        self._cache_bytes += _nbytes(pair[0]) + _nbytes(pair[1])
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            self._forget(next(iter(self._cache)))

    def _forget(self, update_id: int) -> None:
        entry = self._cache.pop(update_id, None)
        if entry is None:
            return
        client_id, tau, theta = entry
        self._cache_bytes -= _nbytes(tau) + _nbytes(theta)
        if self._cached_of.get(client_id) == update_id:
            del self._cached_of[client_id]

    def _check_signature(self, update: Update) -> None:
        """The worker signed the row with the client's secret (services/signing.py); the
        row's sha256 then vouch for the files. Clients enrolled before signing existed
        have no key, and their updates are taken unsigned."""
        if update.client_id not in self._client_keys:
            with session_scope(self.db_url) as s:
                client = s.get(Client, update.client_id)
                self._client_keys[update.client_id] = client.secret_hash if client else None
        key = self._client_keys[update.client_id]
        if key is None:
            return
        if not update.signature:
            raise RejectedUpdate(f"update is not signed (client {update.client_id})", "unsigned")
        if not verify(
            key,
            update.signature,
            update.client_id,
            update.uid,
            update.adapter_sha256 or "",
            update.task_vector_sha256 or "",
        ):
            raise RejectedUpdate(
                f"signature does not match: not signed with client {update.client_id}'s "
                "secret, or the row was changed after signing",
                "bad_signature",
            )

    def _usable(self, update: Update) -> tuple[StateDict, StateDict] | None:
        """(τ, θ) of an update met as someone else's peer; None, and the update rejected,
        when it is unusable."""
        try:
            return self._load(update)
        except RejectedUpdate as exc:
            self._reject(update, exc)
            return None

    def _reject(self, update: Update, exc: RejectedUpdate) -> None:
        log.warning("client=%s update=%s rejected: %s", update.client_id, update.uid, exc)
        with session_scope(self.db_url) as s:
            row = s.get(Update, update.id)
            if row is not None and row.status == "stored":
                row.status = "rejected"
                row.reason = str(exc)[:2000]
        metrics.UPDATES_REJECTED.labels(reason=exc.label).inc()

    def _supersede_older(self, s: Session, newer: Update) -> int:
        """Asynchronous updates of `newer`'s client still `stored` but older than it (it is
        aggregated) become `superseded`: its aggregate already used it in their place, so
        aggregating them would step the client back in time, and left `stored` every
        recovery pass would handle them again. Returns how many."""
        older = list(
            s.scalars(
                select(Update).where(
                    Update.client_id == newer.client_id,
                    Update.status == "stored",
                    Update.round_id.is_(None),
                    Update.id < newer.id,
                )
            )
        )
        for row in older:
            log.info(
                "client=%s update=%s superseded by update=%s", row.client_id, row.uid, newer.uid
            )
            row.status = "superseded"
            row.reason = f"superseded by update {newer.uid}, aggregated before it"
            self._screened.discard(row.id)
        return len(older)

    # --- screening (aggregator/outliers.py) -------------------------------------------
    @property
    def _screening(self) -> bool:
        return self.settings.outlier_norm_ratio > 0 or self.settings.outlier_flip_cosine > 0

    def _trusted(self, update: Update) -> bool:
        """Passed screening: a reference for the sign-flip check."""
        return update.status == "aggregated" or update.id in self._screened

    def _peer_norm(self, update: Update) -> float | None:
        """‖τ‖ of a peer: the worker's stored value, else from τ (None: τ unusable)."""
        norm = update.task_vector_norm
        if norm is not None and norm == norm and norm >= 0:
            return float(norm)
        loaded = self._usable(update)
        return None if loaded is None else outliers.vector_norm(flatten(loaded[0]))

    def _flat_vectors(self, updates: list[Update]) -> Iterator[tuple[int, torch.Tensor]]:
        """(client id, flat τ) of each update, loaded one at a time (a lazy sequence)."""
        for u in updates:
            if (loaded := self._usable(u)) is not None:
                yield u.client_id, flatten(loaded[0])

    def _screen(
        self, update: Update, tau: StateDict
    ) -> tuple[outliers.Outlier | None, list[int] | None]:
        """Screen a validated update against the other clients' latest accepted updates
        before it can enter any aggregate: their median norm (stored norms, no vectors read
        where the worker wrote them), then, for the sign flip, the vectors of those stored
        earlier that passed screening and have a similar norm.

        With aggregate_peers = m > 0 the peers are the update's aggregate candidates (its m
        nearest by sketch; returned, so that the aggregation does not search the index
        again) plus the few clients whose sketch is nearly opposite to its own (a flipped
        copy is never in its victim's sketch group): O(m) rows and vectors, not O(N).
        Returns (the outlier or None, the candidates' update ids or None)."""
        if not self._screening or update.id in self._screened:
            return None, None
        flip = self.settings.outlier_flip_cosine
        candidates: list[int] | None = None
        opposed: list[Update] = []
        with session_scope(self.db_url) as s:
            if self.settings.aggregate_peers > 0:
                candidates, rows = self._nearest_rows(s, [update.client_id])
                peers = self._latest_accepted(s, candidates)
                row = rows.get(update.client_id)
                hits = [] if row is None else outliers.anti_aligned(row.similarity, flip)
                if hits and self._index is not None:
                    ids = self._index.client_ids  # the row's order
                    far = [self._indexed[ids[i]] for i in hits if ids[i] != update.client_id]
                    opposed = self._latest_accepted(s, far)
            else:
                peers = self._latest_accepted(s)
        peers = [u for u in peers if u.client_id != update.client_id]
        known = {u.id for u in peers}
        opposed = [u for u in opposed if u.id not in known and u.client_id != update.client_id]
        norms = {u.id: n for u in peers + opposed if (n := self._peer_norm(u)) is not None}
        flat = flatten(tau)
        own = outliers.vector_norm(flat)
        found = outliers.norm_outlier(
            own, [norms[u.id] for u in peers if u.id in norms], self.settings.outlier_norm_ratio
        )
        if found is None and flip > 0:
            # a copy is of an update stored before it; a reference must have passed screening
            refs = [
                u
                for u in peers + opposed
                if u.id < update.id
                and u.id in norms
                and self._trusted(u)
                and outliers.in_flip_band(own, norms[u.id])
            ]
            found = outliers.sign_flipped(flat, self._flat_vectors(refs), flip)
        if found is None:
            self._screened.add(update.id)
        return found, candidates

    def _screen_pending(
        self, loaded: list[Loaded], vectors: torch.Tensor, now: torch.Tensor
    ) -> list[int]:
        """Updates of an aggregate not screened through their own event yet (the event is
        still queued behind others, or this process restarted), screened here against the
        rest of the aggregate, oldest first, from its vectors and cosines; flagged ones are
        quarantined. Returns the positions in `loaded` that stay."""
        n = len(loaded)
        pending = sorted(
            (
                i
                for i, x in enumerate(loaded)
                if x.update.status == "stored" and x.update.id not in self._screened
            ),
            key=lambda i: loaded[i].update.id,
        )
        if not pending or not self._screening:
            return list(range(n))
        norms = [outliers.vector_norm(v) for v in vectors]
        dropped: set[int] = set()
        for i in pending:
            mine = loaded[i].update
            others = [j for j in range(n) if j != i and j not in dropped]
            found = outliers.norm_outlier(
                norms[i], [norms[j] for j in others], self.settings.outlier_norm_ratio
            )
            if found is None:
                refs = (
                    (loaded[j].update.client_id, float(now[i, j]), norms[j])
                    for j in others
                    if loaded[j].update.id < mine.id and self._trusted(loaded[j].update)
                )
                found = outliers.flip_outlier(norms[i], refs, self.settings.outlier_flip_cosine)
            if found is None:
                self._screened.add(mine.id)
            else:
                self._quarantine(mine, found)
                dropped.add(i)
        return [i for i in range(n) if i not in dropped]

    def _quarantine(self, update: Update, found: outliers.Outlier) -> None:
        log.warning(
            "client=%s update=%s (id %s) quarantined, %s: %s",
            update.client_id,
            update.uid,
            update.id,
            found.reason,
            found.message,
        )
        with session_scope(self.db_url) as s:
            row = s.get(Update, update.id)
            if row is not None and row.status == "stored":
                row.status = "quarantined"
                row.reason = f"{found.reason}: {found.message}"[:2000]
        metrics.UPDATES_QUARANTINED.labels(reason=found.reason).inc()
        self._screened.discard(update.id)
        self._forget(update.id)  # never read again
        if self._index is not None and self._indexed.get(update.client_id) == update.id:
            # out of the sketch index now; the client's previous accepted update (if any)
            # is put back at the next event
            self._index.remove(update.client_id)
            del self._indexed[update.client_id]

    # --- rounds -----------------------------------------------------------------------
    def _round_complete(self, round_id: int) -> bool:
        with session_scope(self.db_url) as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != "training":
                return False
            reported = set(
                s.scalars(
                    select(Update.client_id).where(
                        Update.round_id == round_id, Update.status.in_(REPORTED)
                    )
                )
            )
            return set(rnd.participants) <= reported

    def _round_targets(self, round_id: int) -> list[int]:
        with session_scope(self.db_url) as s:
            return sorted(
                set(
                    s.scalars(
                        select(Update.client_id).where(
                            Update.round_id == round_id, Update.status == "stored"
                        )
                    )
                )
            )

    # --- aggregation ------------------------------------------------------------------
    def _latest_accepted(self, s: Session, ids: list[int] | None = None) -> list[Update]:
        """The latest accepted update of every client (ids: only these updates)."""
        newest = (
            select(func.max(Update.id))
            .where(Update.status.in_(ACCEPTED))
            .group_by(Update.client_id)
        )
        query = select(Update).where(Update.id.in_(newest if ids is None else ids))
        return list(s.scalars(query.order_by(Update.client_id)))

    def _contributions(
        self, targets: list[int], candidates: list[int] | None = None
    ) -> tuple[list[Loaded], dict[int, tuple[int, int]]]:
        """The latest accepted update of every client (with aggregate_peers = m > 0: of the
        targets and their m nearest clients by sketch, or the given candidates' update ids
        when screening just found them), loaded; plus, per client, its current
        personalized (version, watermark)."""
        with session_scope(self.db_url) as s:
            if candidates is not None:
                latest = self._latest_accepted(s, candidates)
            elif self.settings.aggregate_peers > 0:
                latest = self._latest_accepted(s, self._nearest(s, targets))
            else:
                latest = self._latest_accepted(s)
            newest = (
                select(func.max(PersonalizedAdapter.id))
                .where(PersonalizedAdapter.client_id.in_([u.client_id for u in latest]))
                .group_by(PersonalizedAdapter.client_id)
            )
            current: dict[int, tuple[int, int]] = {}
            rows = s.scalars(select(PersonalizedAdapter).where(PersonalizedAdapter.id.in_(newest)))
            for row in rows:
                current[row.client_id] = (row.version, int(row.sources.get("watermark", 0)))
        loaded: list[Loaded] = []
        for update in latest:  # some may not be validated through their own event yet
            if (pair := self._usable(update)) is not None:
                loaded.append(Loaded(update, *pair))
        return loaded, current

    def aggregate(
        self, targets: list[int], *, round_id: int | None, candidates: list[int] | None = None
    ) -> None:
        """Publish a new θ̄ for each target client whose own update is fresh (candidates:
        with aggregate_peers > 0, the update ids `_screen` found for the one target)."""
        t0 = time.perf_counter()
        loaded, current = self._contributions(targets, candidates)
        if loaded:
            vectors = torch.stack([flatten(x.task_vector) for x in loaded])
            now = cosine_matrix(vectors)
            keep = self._screen_pending(loaded, vectors, now)
            del vectors
            if len(keep) < len(loaded):
                loaded = [loaded[i] for i in keep]
                pick = torch.tensor(keep, dtype=torch.int64)
                now = now[pick][:, pick]
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
        sim_index = self._similarity_index(loaded, now)
        plan = self.strategy.plan(contributions, sim_index)
        watermark = max(x.update.id for x in loaded)
        index = {x.update.client_id: i for i, x in enumerate(loaded)}
        published: list[tuple[int, PersonalizedAdapter]] = []
        staleness_used: list[int] = []  # of every update aggregated into a published adapter
        for client_id in targets:
            if client_id not in index or loaded[index[client_id]].update.status != "stored":
                continue
            version, seen = current.get(client_id, (0, 0))
            mine = index[client_id]
            chosen = [mine] + [i for i, x in enumerate(loaded) if i != mine and x.update.id > seen]
            sub_plan = Plan(
                similarity=plan.similarity[chosen][:, chosen],
                groups=[plan.groups[i] for i in chosen],
            )
            started = (
                self._cold_start(mine, plan, contributions, loaded, current)
                if version == 0
                else None
            )
            if started is not None:  # a newcomer: its group's current models
                new_state, weights = started
                sources = {
                    "watermark": watermark,
                    "cold_start": {
                        str(loaded[i].update.client_id): round(w, 6) for i, w in weights.items()
                    },
                    "updates": [loaded[mine].update.uid],  # its own, added whole
                    "groups": [plan.groups[mine]],
                }
            else:
                base = self._base(client_id, version)
                new_state = self.strategy.personalize(
                    0, base, [contributions[i] for i in chosen], sub_plan
                )
                staleness_used += [contributions[i].staleness for i in chosen]
                sources = {
                    "watermark": watermark,
                    "updates": [loaded[i].update.uid for i in chosen],
                    "groups": sub_plan.groups,
                }
            check_state_dict(new_state, self.expected_shapes())
            key = ads.personalized_key(client_id, version + 1)
            sha = ads.put_state(self.store, key, new_state, client_id=str(client_id))
            published.append(
                (
                    client_id,
                    PersonalizedAdapter(
                        client_id=client_id,
                        version=version + 1,
                        key=key,
                        sha256=sha,
                        strategy=self.strategy.name,
                        sources=sources,
                        trigger_update_id=loaded[mine].update.id,
                    ),
                )
            )
        self._commit(loaded, plan, sim_index, now, published, targets, round_id)
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

    def _cold_start(
        self,
        mine: int,
        plan: Plan,
        contributions: list[Contribution],
        loaded: list[Loaded],
        current: dict[int, tuple[int, int]],
    ) -> tuple[StateDict, dict[int, float]] | None:
        """A client with no personalized adapter yet, whose group has clients that have one:
        the strategy's first θ̄ for it from their current θ̄ (None: the usual rule). Only
        the models it weighs are read, and only for a newcomer."""
        with_model = {
            i for i, x in enumerate(loaded) if i != mine and x.update.client_id in current
        }
        weights = self.strategy.cold_start_weights(mine, plan, with_model)
        if not weights:
            return None
        models = {
            i: self._base(loaded[i].update.client_id, current[loaded[i].update.client_id][0])
            for i in weights
        }
        return self.strategy.cold_start(mine, contributions, weights, models), weights

    # --- the sketch index (aggregate_peers > 0) ----------------------------------------
    def _nearest(self, s: Session, targets: list[int]) -> list[int]:
        """Update ids of the targets and of their peers: the index is brought up to date
        with every client's latest sketch, then each target takes the m members of its
        sketch group most similar to it. Work per aggregation: one pass over the N × k
        sketches and reading what changed (ids of N latest updates, no rows, no vectors)."""
        return self._nearest_rows(s, targets)[0]

    def _nearest_rows(
        self, s: Session, targets: list[int]
    ) -> tuple[list[int], dict[int, IndexUpdate]]:
        """_nearest, and each target's IndexUpdate (its sketch similarity row)."""
        k, m = self.settings.sketch_dim, self.settings.aggregate_peers
        if k <= 0:
            raise ValueError("FEDVEC_AGGREGATE_PEERS needs sketches: set FEDVEC_SKETCH_DIM > 0")
        latest: dict[int, int] = {
            client_id: update_id
            for client_id, update_id in s.execute(
                select(Update.client_id, func.max(Update.id))
                .where(Update.status.in_(ACCEPTED))
                .group_by(Update.client_id)
            )
        }
        if self._index is None:
            self._index = SketchIndex(k, self.settings.group_threshold, capacity=len(latest))
        index = self._index
        for gone in [c for c in self._indexed if c not in latest]:
            index.remove(gone)
            del self._indexed[gone]
        wanted = set(targets) & set(latest)
        changed = [
            update_id
            for client_id, update_id in latest.items()
            if self._indexed.get(client_id) != update_id or client_id in wanted
        ]
        others, mine = [], []
        for update in s.scalars(
            select(Update).where(Update.id.in_(changed)).options(undefer(Update.sketch))
        ):
            # another client's update, stored but not validated yet (its event still
            # queued), may be unusable: refused there, so it cannot fail this event too
            sketch = self._sketch_of(update, update.sketch)
            if sketch is None:
                continue
            (mine if update.client_id in wanted else others).append((update.client_id, sketch))
            self._indexed[update.client_id] = update.id
        # bulk rows without similarity (start-up), then the targets with theirs, which see
        # every new sketch
        index.update(others, similarity=False)
        keep = set(wanted)
        rows: dict[int, IndexUpdate] = {}
        for row in index.update(mine):
            rows[row.client_id] = row
            keep.update(index.peers(row, m))
        metrics.SIMILARITY_INDEX_CLIENTS.set(len(index))
        return [latest[c] for c in keep], rows

    def _sketch_of(self, update: Update, stored: bytes | None) -> torch.Tensor | None:
        """The worker's sketch of τ; made here from τ for an update without a usable one
        (stored before sketches existed, or by a worker with other sketch settings). None
        when τ itself is unusable (the update is then rejected)."""
        k = self.settings.sketch_dim
        if stored is not None:
            try:
                return sketch_from_bytes(stored, k)
            except ValueError as exc:
                log.warning(
                    "client=%s update=%s: %s; sketching τ here", update.client_id, update.uid, exc
                )
        if (loaded := self._usable(update)) is None:
            return None
        return sketch_state_dict(loaded[0], k, self.settings.sketch_seed)

    def _similarity_index(self, loaded: list[Loaded], now: torch.Tensor) -> torch.Tensor:
        """The stored index for these clients, moved by what their new vectors show."""
        n = len(loaded)
        pos = {x.update.client_id: i for i, x in enumerate(loaded)}
        previous = torch.full((n, n), float("nan"), dtype=torch.float64)
        unchanged = torch.zeros((n, n), dtype=torch.bool)
        with session_scope(self.db_url) as s:
            edges = s.scalars(select(SimilarityEdge).where(SimilarityEdge.client_id.in_(pos)))
            for e in edges:
                if e.peer_id not in pos:
                    continue
                a, b = pos[e.client_id], pos[e.peer_id]
                previous[a, b] = e.cosine
                unchanged[a, b] = (
                    e.update_id == loaded[a].update.id and e.peer_update_id == loaded[b].update.id
                )
        return smoothed_similarity(now, previous, unchanged, self.settings.similarity_memory)

    def _base(self, client_id: int, version: int) -> StateDict:
        limit = self.settings.max_adapter_bytes
        if version == 0:
            return ads.get_state(self.store, ads.INITIAL_ADAPTER_KEY, max_bytes=limit)
        with session_scope(self.db_url) as s:
            row = s.scalars(
                select(PersonalizedAdapter).where(
                    PersonalizedAdapter.client_id == client_id,
                    PersonalizedAdapter.version == version,
                )
            ).one()
            key, sha = row.key, row.sha256
        return ads.get_state(self.store, key, max_bytes=limit, expected_sha256=sha)

    def _commit(
        self,
        loaded: list[Loaded],
        plan: Plan,
        sim_index: torch.Tensor,
        now: torch.Tensor,
        published: list[tuple[int, PersonalizedAdapter]],
        targets: list[int],
        round_id: int | None,
    ) -> None:
        stamp = datetime.now(UTC)
        ids = [x.update.client_id for x in loaded]
        raw = cosine_matrix(torch.stack([flatten(x.trained) for x in loaded]))
        per_layer = layerwise_cosine_matrices([x.task_vector for x in loaded])
        changed = set(targets)
        with session_scope(self.db_url) as s:
            # edges of the clients that changed, both directions
            s.execute(
                delete(SimilarityEdge).where(
                    or_(SimilarityEdge.client_id.in_(changed), SimilarityEdge.peer_id.in_(changed))
                )
            )
            for a, ca in enumerate(ids):
                for b, cb in enumerate(ids):
                    if a == b or (ca not in changed and cb not in changed):
                        continue
                    s.add(
                        SimilarityEdge(
                            client_id=ca,
                            peer_id=cb,
                            cosine=float(sim_index[a, b]),
                            update_cosine=float(now[a, b]),
                            raw_cosine=float(raw[a, b]),
                            layer_cosines={
                                k: round(float(m[a, b]), 6) for k, m in per_layer.items()
                            },
                            update_id=loaded[a].update.id,
                            peer_update_id=loaded[b].update.id,
                            updated_at=stamp,
                        )
                    )
            if self._index is not None and self.settings.aggregate_peers > 0:
                labels = self._index.labels()  # the whole population's groups, by sketch
                self._store_groups(s, list(labels), list(labels.values()), round_id)
            else:
                used = self.strategy.threshold(sim_index) if len(ids) > 1 else None
                self._store_groups(s, ids, plan.groups, round_id, used)
            for client_id, row in published:
                s.add(row)
                upd = s.get(Update, loaded[ids.index(client_id)].update.id)
                upd.status = "aggregated"
                upd.aggregated_at = stamp
                created = as_utc(upd.created_at)
                metrics.STORED_TO_PUBLISHED_SECONDS.observe((stamp - created).total_seconds())
                self._supersede_older(s, upd)  # in the same transaction
            self._finish_round(round_id, s)
            entries = s.scalar(select(func.count()).select_from(SimilarityEdge)) or 0
        metrics.UPDATES_AGGREGATED.inc(len(published))
        metrics.SIMILARITY_INDEX_ENTRIES.set(entries)
        for client_id, _ in published:  # `aggregated` now: trusted by status
            self._screened.discard(loaded[ids.index(client_id)].update.id)

    def _finish_round(self, round_id: int | None, s: Session | None = None) -> None:
        if round_id is None:
            return
        if s is None:
            with session_scope(self.db_url) as s2:
                self._finish_round(round_id, s2)
            return
        rnd = s.get(Round, round_id)
        if rnd is not None:
            if rnd.status != "aggregated":
                metrics.ROUNDS_COMPLETED.inc()
            rnd.status = "aggregated"
            rnd.aggregated_at = datetime.now(UTC)

    def recover(self, older_than_s: float = 0.0) -> None:
        """Finish what a crash or a lost event left undone: complete rounds not aggregated,
        asynchronous updates stored but not aggregated. At start-up for everything; then
        every FEDVEC_RECOVER_INTERVAL for updates older than that, whose event will not come
        (lost with the broker, or its task gave up): the database, not the queue, says what
        is left to do."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        with session_scope(self.db_url) as s:
            open_rounds = list(s.scalars(select(Round.id).where(Round.status == "training")))
            query = select(Update).where(Update.status == "stored", Update.round_id.is_(None))
            if older_than_s > 0:
                query = query.where(Update.created_at < cutoff)
            pending = list(s.scalars(query.order_by(Update.id)))
        with exclusive(self.db_url, "fedvec-aggregator"):
            for round_id in open_rounds:
                if self._round_complete(round_id):
                    log.info("recovering round=%s", round_id)
                    self.aggregate(self._round_targets(round_id), round_id=round_id)
        for update in pending:  # handle() takes the lock itself
            log.info("recovering client=%s update=%s", update.client_id, update.uid)
            try:
                self.handle(UpdateStored(update.uid, update.client_id, None).to_dict())
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database or the store is away: the whole pass waits
                # one update that cannot be handled must not hold up the ones after it;
                # it stays `stored` and is tried again at the next pass
                log.exception(
                    "client=%s update=%s could not be recovered: %s",
                    update.client_id,
                    update.uid,
                    exc,
                )

    def _store_groups(
        self,
        s: Session,
        ids: list[int],
        labels: list[int],
        round_id: int | None,
        threshold: float | None = None,
    ) -> None:
        """A new grouping version when membership changed."""
        latest = s.scalar(select(func.max(Grouping.version)))
        new = dict(zip(ids, labels, strict=True))
        metrics.GROUPS_CURRENT.set(len(set(labels)))
        if latest is not None:
            if self._groups_seen is not None and self._groups_seen[0] == latest:
                old = self._groups_seen[1]  # what this process wrote or read last
            else:
                members = select(GroupMember.client_id, GroupMember.group_index)
                old = dict(s.execute(members.where(GroupMember.version == latest)).tuples().all())
            self._groups_seen = (latest, old)
            if old == new:
                return
        version = (latest or 0) + 1
        s.add(
            Grouping(
                version=version,
                strategy=self.strategy.name,
                threshold=self.settings.group_threshold if threshold is None else threshold,
                num_groups=len(set(labels)),
                round_id=round_id,
            )
        )
        s.flush()
        s.execute(
            insert(GroupMember),
            [dict(version=version, client_id=c, group_index=g) for c, g in new.items()],
        )
        # valid once this transaction commits; a failed commit leaves a version this
        # process never sees as latest, so the cache is not used
        self._groups_seen = (version, new)
        metrics.REGROUPS.inc()
        for label in set(labels):
            metrics.GROUP_SIZE.observe(labels.count(label))
