"""With FEDVEC_AGGREGATE_PEERS = m > 0: the in-memory sketch index of every client's latest
accepted update (aggregator/sketch_index.py), built from the database at the first
aggregation and kept up to date after it. An aggregate then reads the target and its m
nearest clients by sketch instead of every client."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from aggregator import outliers, records
from aggregator.loader import UpdateLoader
from aggregator.sketch import from_bytes as sketch_from_bytes
from aggregator.sketch import sketch_state_dict
from aggregator.sketch_index import IndexUpdate, SketchIndex
from schema.models import Update
from services import metrics
from services.settings import Settings

log = logging.getLogger(__name__)


class PeerIndex:
    def __init__(self, settings: Settings, loader: UpdateLoader) -> None:
        self.settings = settings
        self.loader = loader  # τ for an update without a usable stored sketch
        self._sketches: SketchIndex | None = None  # created at the first search
        self._indexed: dict[int, int] = {}  # client id -> update id of its indexed sketch

    # read-only views, for tests and diagnostics
    @property
    def sketches(self) -> SketchIndex | None:
        """The sketch index (None before the first search)."""
        return self._sketches

    @property
    def indexed(self) -> Mapping[int, int]:
        """Client id -> id of the update whose sketch is in the index."""
        return MappingProxyType(self._indexed)

    def nearest(self, s: Session, targets: list[int]) -> tuple[list[int], dict[int, IndexUpdate]]:
        """Update ids of the targets and of their peers, and each target's IndexUpdate (its
        sketch similarity row): the index is brought up to date with every client's latest
        sketch, then each target takes the m members of its sketch group most similar to
        it. Work per aggregation: one pass over the N × k sketches and reading what
        changed (ids of N latest updates, no rows, no vectors)."""
        k, m = self.settings.sketch_dim, self.settings.aggregate_peers
        if k <= 0:
            raise ValueError("FEDVEC_AGGREGATE_PEERS needs sketches: set FEDVEC_SKETCH_DIM > 0")
        latest = records.latest_accepted_ids(s)
        if self._sketches is None:
            self._sketches = SketchIndex(k, self.settings.group_threshold, capacity=len(latest))
        sketches = self._sketches
        for gone in [c for c in self._indexed if c not in latest]:
            sketches.remove(gone)
            del self._indexed[gone]
        wanted = set(targets) & set(latest)
        changed = [
            update_id
            for client_id, update_id in latest.items()
            if self._indexed.get(client_id) != update_id or client_id in wanted
        ]
        others: list[tuple[int, torch.Tensor]] = []
        mine: list[tuple[int, torch.Tensor]] = []
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
        sketches.update(others, similarity=False)
        keep = set(wanted)
        target_rows: dict[int, IndexUpdate] = {}
        for row in sketches.update(mine):
            target_rows[row.client_id] = row
            keep.update(sketches.peers(row, m))
        metrics.SIMILARITY_INDEX_CLIENTS.set(len(sketches))
        return [latest[c] for c in keep], target_rows

    def opposed(self, row: IndexUpdate, flip_cosine: float) -> list[int]:
        """Update ids of the few indexed clients whose sketch is nearly opposite to the
        row's client's (a sign-flipped copy is never in its victim's sketch group)."""
        hits = outliers.anti_aligned(row.similarity, flip_cosine)
        if not hits or self._sketches is None:
            return []
        ids = self._sketches.client_ids  # the row's order
        return [self._indexed[ids[i]] for i in hits if ids[i] != row.client_id]

    def groups(self) -> dict[int, int] | None:
        """Client id -> sketch group of the whole population (None before the first search)."""
        return None if self._sketches is None else self._sketches.labels()

    def drop(self, update: Update) -> None:
        """A quarantined update leaves the index at once; the client's previous accepted
        update (if any) is put back at the next search."""
        if self._sketches is not None and self._indexed.get(update.client_id) == update.id:
            self._sketches.remove(update.client_id)
            del self._indexed[update.client_id]

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
        if (pair := self.loader.usable(update)) is None:
            return None
        return sketch_state_dict(pair[0], k, self.settings.sketch_seed)
