"""Reading an update's τ and θ from the object store: sha256 (from the row, which
aggregator/intake.py wrote only after checking the client's signature) and tensor shapes
checked, and the result kept in a bounded in-memory
cache (one update per client). Also reads the personalized adapters that aggregates start
from."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from sqlalchemy import select

from aggregator import records
from aggregator.task_vectors import InvalidTaskVector, StateDict, check_state_dict, shapes
from schema.models import PersonalizedAdapter, Update
from services import adapter_store as ads
from services.db import session_scope
from services.object_store import ObjectNotFound, ObjectStore
from services.settings import Settings

log = logging.getLogger(__name__)

CACHE_BYTES = 1 << 30  # loaded (τ, θ) pairs kept in memory

Pair = tuple[StateDict, StateDict]  # (τ, θ)


def _nbytes(sd: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


class RejectedUpdate(Exception):
    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.label = label  # bounded metric label


@dataclass
class Loaded:
    update: Update
    task_vector: StateDict
    trained: StateDict


class VectorCache:
    """Update id -> (client id, τ, θ): task vectors are immutable, so caching them is safe.
    One update per client, and bounded in bytes: at 7B-model adapter sizes a few hundred
    pairs are already gigabytes."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self._entries: OrderedDict[int, tuple[int, StateDict, StateDict]] = OrderedDict()
        self._update_of: dict[int, int] = {}  # client id -> the update id cached for it
        self._nbytes = 0
        self._limit = limit

    # read-only views, for tests and diagnostics
    @property
    def entries(self) -> Mapping[int, tuple[int, StateDict, StateDict]]:
        """Update id -> (client id, τ, θ), least recently used first."""
        return MappingProxyType(self._entries)

    @property
    def update_of(self) -> Mapping[int, int]:
        """Client id -> id of the update cached for it."""
        return MappingProxyType(self._update_of)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tensors, as counted against the limit."""
        return self._nbytes

    def get(self, update_id: int) -> Pair | None:
        if update_id not in self._entries:
            return None
        self._entries.move_to_end(update_id)
        _, tau, theta = self._entries[update_id]
        return tau, theta

    def put(self, update: Update, pair: Pair) -> None:
        """Cache an update's (τ, θ), one update per client: aggregates read each client's
        latest accepted update, so a client's older one is dropped when a newer one is
        loaded (and an older one loaded after it is not kept). Otherwise a long-running
        aggregator's cache grows with every update until it reaches its byte limit."""
        held = self._update_of.get(update.client_id)
        if held is not None and held > update.id:
            return
        if held is not None:
            self.forget(held)
        self._entries[update.id] = (update.client_id, *pair)
        self._update_of[update.client_id] = update.id
        self._nbytes += _nbytes(pair[0]) + _nbytes(pair[1])
        while self._nbytes > self._limit and len(self._entries) > 1:
            self.forget(next(iter(self._entries)))

    def forget(self, update_id: int) -> None:
        entry = self._entries.pop(update_id, None)
        if entry is None:
            return
        client_id, tau, theta = entry
        self._nbytes -= _nbytes(tau) + _nbytes(theta)
        if self._update_of.get(client_id) == update_id:
            del self._update_of[client_id]


class UpdateLoader:
    def __init__(self, settings: Settings, store: ObjectStore, db_url: str) -> None:
        self.settings = settings
        self.store = store
        self.db_url = db_url
        self.cache = VectorCache()
        self._expected: dict[str, tuple[int, ...]] | None = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the initial adapter: every τ, θ and θ̄ must have exactly these."""
        if self._expected is None:
            initial = ads.get_state(
                self.store, ads.INITIAL_ADAPTER_KEY, max_bytes=self.settings.max_adapter_bytes
            )
            self._expected = shapes(initial)
        return self._expected

    def load(self, update: Update) -> Pair:
        """τ and θ of an update, read and checked; RejectedUpdate if unusable."""
        if (cached := self.cache.get(update.id)) is not None:
            return cached
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
        self.cache.put(update, (tau, theta))
        return tau, theta

    def usable(self, update: Update) -> Pair | None:
        """(τ, θ) of an update; None, and the update rejected, when it is unusable. Also for
        an update met as someone else's peer, whose own event may still be queued."""
        try:
            return self.load(update)
        except RejectedUpdate as exc:
            records.reject(self.db_url, update, str(exc), exc.label)
            return None

    def personalized(self, client_id: int, version: int) -> StateDict:
        """A client's θ̄ of that version (0: the initial adapter)."""
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
