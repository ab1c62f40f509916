"""What an aggregation publishes: the personalized adapters (objects written to the store
under their (client, version) key first), then, in one transaction, their rows, the
similarity index (pairwise edges), a new grouping version when membership changed, and the
aggregated updates' statuses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import torch
from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.orm import Session

from aggregator import records
from aggregator.loader import Loaded, UpdateLoader
from aggregator.similarity import (
    cosine,
    cosine_matrix,
    layerwise_cosine_matrices,
    smoothed_similarity,
)
from aggregator.strategies import Contribution, Plan, Strategy
from aggregator.task_vectors import StateDict, check_state_dict, flatten
from schema.models import (
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    SimilarityEdge,
    Update,
    UpdateStatus,
)
from services import adapter_store as ads
from services import metrics
from services.db import as_utc, session_scope
from services.object_store import ObjectStore
from services.settings import Settings

Current = dict[int, tuple[int, int]]  # client id -> (θ̄ version, watermark) it has now
Published = list[tuple[int, PersonalizedAdapter]]  # (client id, its new row), not added yet


def current_adapters(s: Session, client_ids: list[int]) -> Current:
    """Per client, the version of its latest personalized adapter and the highest update id
    that went into it (clients without one are absent)."""
    newest = (
        select(func.max(PersonalizedAdapter.id))
        .where(PersonalizedAdapter.client_id.in_(client_ids))
        .group_by(PersonalizedAdapter.client_id)
    )
    current: Current = {}
    for row in s.scalars(select(PersonalizedAdapter).where(PersonalizedAdapter.id.in_(newest))):
        current[row.client_id] = (row.version, int(row.sources.get("watermark", 0)))
    return current


class Publisher:
    def __init__(
        self,
        settings: Settings,
        strategy: Strategy,
        loader: UpdateLoader,
        store: ObjectStore,
        db_url: str,
    ) -> None:
        self.settings = settings
        self.strategy = strategy
        self.loader = loader  # the θ̄ an aggregate starts from, and the expected shapes
        self.store = store
        self.db_url = db_url
        # (version, membership) of the grouping last read or written: not re-read from the
        # database per update (N rows)
        self._groups_seen: tuple[int, dict[int, int]] | None = None

    # --- before the transaction ---------------------------------------------------------
    def similarity(self, loaded: list[Loaded], cosines: torch.Tensor) -> torch.Tensor:
        """The similarity the strategy groups by: the stored edges between these clients,
        moved by what their new task vectors' cosines show (FEDVEC_SIMILARITY_MEMORY)."""
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
        return smoothed_similarity(cosines, previous, unchanged, self.settings.similarity_memory)

    def personalize(
        self,
        targets: list[int],
        loaded: list[Loaded],
        contributions: list[Contribution],
        plan: Plan,
        current: Current,
    ) -> tuple[Published, list[int]]:
        """A new θ̄ for each target whose own update in `loaded` is fresh, written to the
        store; returns their rows (for commit) and the staleness of every update aggregated
        into them (for the metric)."""
        watermark = max(x.update.id for x in loaded)
        position = {x.update.client_id: i for i, x in enumerate(loaded)}
        published: Published = []
        staleness_used: list[int] = []
        for client_id in targets:
            mine = position.get(client_id)
            if mine is None or loaded[mine].update.status != UpdateStatus.STORED:
                continue
            version, seen = current.get(client_id, (0, 0))
            started = (
                self._cold_start(mine, plan, contributions, loaded, current)
                if version == 0
                else None
            )
            if started is not None:  # a newcomer: its group's current models
                new_state, weights = started
                sources: dict[str, Any] = {
                    "watermark": watermark,
                    "cold_start": {
                        str(loaded[i].update.client_id): round(w, 6) for i, w in weights.items()
                    },
                    "updates": [loaded[mine].update.uid],  # its own, added whole
                    "groups": [plan.groups[mine]],
                }
            else:
                # its own update and the peers' updates newer than its θ̄ already contains
                chosen = [mine] + [
                    i for i, x in enumerate(loaded) if i != mine and x.update.id > seen
                ]
                sub_plan = Plan(
                    similarity=plan.similarity[chosen][:, chosen],
                    groups=[plan.groups[i] for i in chosen],
                )
                base = self.loader.personalized(client_id, version)
                new_state = self.strategy.personalize(
                    0, base, [contributions[i] for i in chosen], sub_plan
                )
                staleness_used += [contributions[i].staleness for i in chosen]
                sources = {
                    "watermark": watermark,
                    "updates": [loaded[i].update.uid for i in chosen],
                    "groups": sub_plan.groups,
                }
            check_state_dict(new_state, self.loader.expected_shapes())
            # written before the transaction that references it commits; a crash in between
            # leaves an object no row points to, never a row without its object
            key = ads.personalized_key(client_id, version + 1)
            sha = ads.put_state(self.store, key, new_state, client_id=str(client_id))
            row = PersonalizedAdapter(
                client_id=client_id,
                version=version + 1,
                key=key,
                sha256=sha,
                strategy=self.strategy.name,
                sources=sources,
                trigger_update_id=loaded[mine].update.id,
            )
            published.append((client_id, row))
        return published, staleness_used

    def _cold_start(
        self,
        mine: int,
        plan: Plan,
        contributions: list[Contribution],
        loaded: list[Loaded],
        current: Current,
    ) -> tuple[StateDict, dict[int, float]] | None:
        """A client with no personalized adapter yet, when peers have one: the strategy's
        first θ̄ for it from their current θ̄ (None: the usual rule). Its affinity with each
        such peer is the cosine of its update with the peer's θ̄ minus the initial adapter.
        Each model is read once, only for a newcomer: as many as the task vectors and
        trained parameters `loaded` already holds."""
        if not self.strategy.places_newcomers:
            return None
        with_model = [
            i for i, x in enumerate(loaded) if i != mine and x.update.client_id in current
        ]
        if not with_model:
            return None
        initial = flatten(self.loader.personalized(0, 0))
        mine_vector = flatten(contributions[mine].task_vector)
        models = {
            i: self.loader.personalized(
                loaded[i].update.client_id, current[loaded[i].update.client_id][0]
            )
            for i in with_model
        }
        affinity = {i: cosine(mine_vector, flatten(m) - initial) for i, m in models.items()}
        weights = self.strategy.cold_start_weights(mine, plan, affinity)
        if not weights:
            return None
        return self.strategy.cold_start(mine, contributions, weights, models), weights

    # --- the transaction ----------------------------------------------------------------
    def commit(
        self,
        loaded: list[Loaded],
        plan: Plan,
        similarity: torch.Tensor,
        cosines: torch.Tensor,
        published: Published,
        targets: list[int],
        round_id: int | None,
        sketch_groups: dict[int, int] | None,
    ) -> list[int]:
        """One transaction: the targets' similarity edges, the groups (sketch_groups: the
        whole population's, from the sketch index; else the plan's), the published rows,
        their updates `aggregated` (older stored ones of their clients `superseded`), the
        round finished. Returns the ids of the updates it took out of `stored`."""
        stamp = datetime.now(UTC)
        ids = [x.update.client_id for x in loaded]
        with session_scope(self.db_url) as s:
            self._write_edges(s, loaded, similarity, cosines, set(targets), stamp)
            if sketch_groups is not None:
                self._store_groups(s, list(sketch_groups), list(sketch_groups.values()), round_id)
            else:
                used = self.strategy.threshold(similarity) if len(ids) > 1 else None
                self._store_groups(s, ids, plan.groups, round_id, used)
            done: list[int] = []
            for client_id, row in published:
                s.add(row)
                upd = s.get(Update, loaded[ids.index(client_id)].update.id)
                upd.status = UpdateStatus.AGGREGATED
                upd.aggregated_at = stamp
                created = as_utc(upd.created_at)
                metrics.STORED_TO_PUBLISHED_SECONDS.observe((stamp - created).total_seconds())
                done.append(upd.id)
                done += records.supersede_older(s, upd)  # in the same transaction
            if round_id is not None:
                records.finish_round(s, round_id)
            entries = s.scalar(select(func.count()).select_from(SimilarityEdge)) or 0
        metrics.UPDATES_AGGREGATED.inc(len(published))
        metrics.SIMILARITY_INDEX_ENTRIES.set(entries)
        return done

    def _write_edges(
        self,
        s: Session,
        loaded: list[Loaded],
        similarity: torch.Tensor,
        cosines: torch.Tensor,
        changed: set[int],
        stamp: datetime,
    ) -> None:
        """The edges of the clients that changed, both directions, replaced."""
        ids = [x.update.client_id for x in loaded]
        raw = cosine_matrix(torch.stack([flatten(x.trained) for x in loaded]))
        per_layer = layerwise_cosine_matrices([x.task_vector for x in loaded])
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
                        cosine=float(similarity[a, b]),
                        update_cosine=float(cosines[a, b]),
                        raw_cosine=float(raw[a, b]),
                        layer_cosines={k: round(float(m[a, b]), 6) for k, m in per_layer.items()},
                        update_id=loaded[a].update.id,
                        peer_update_id=loaded[b].update.id,
                        updated_at=stamp,
                    )
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
