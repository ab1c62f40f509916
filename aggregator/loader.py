"""Reading an update's τ and θ from the object store: the signature checked before any byte
is read, sha256 and tensor shapes checked after, and the result kept in a bounded in-memory
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
from schema.models import Client, PersonalizedAdapter, Update
from services import adapter_store as ads
from services.db import session_scope
from services.object_store import ObjectNotFound, ObjectStore
from services.settings import Settings
from services.signing import hmac_verify, verify

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
        # client id -> (public key, HMAC key) as the database holds them
        self._client_keys: dict[int, tuple[str | None, str | None]] = {}

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

    def _check_signature(self, update: Update) -> None:
        """The worker signed the row with the client's private key (services/signing.py);
        the row's sha256 then vouch for the files. A client not yet rotated to a key pair
        is verified by HMAC while FEDVEC_ACCEPT_HMAC allows; clients enrolled before signing
        existed have neither, and their updates are taken unsigned."""
        try:
            self._verify(update, *self._keys(update.client_id))
        except RejectedUpdate:
            # the key may have been rotated since it was cached: check once more with the
            # database's key before refusing
            self._client_keys.pop(update.client_id, None)
            self._verify(update, *self._keys(update.client_id))

    def _keys(self, client_id: int) -> tuple[str | None, str | None]:
        if client_id in self._client_keys:
            return self._client_keys[client_id]
        with session_scope(self.db_url) as s:
            client = s.get(Client, client_id)
            keys = (client.public_key, client.secret_hash) if client else (None, None)
        if keys != (None, None):  # a client without a key is read again: it may get one
            self._client_keys[client_id] = keys
        return keys

    def _verify(self, update: Update, public: str | None, hmac_key: str | None) -> None:
        if public is None and hmac_key is None:
            return
        if not update.signature:
            raise RejectedUpdate(f"update is not signed (client {update.client_id})", "unsigned")
        fields = (
            update.client_id,
            update.uid,
            update.adapter_sha256 or "",
            update.task_vector_sha256 or "",
        )
        if public is not None:
            ok = verify(public, update.signature, *fields)
        elif not self.settings.accept_hmac:
            raise RejectedUpdate(
                f"client {update.client_id} signs with HMAC, which FEDVEC_ACCEPT_HMAC=false "
                "refuses: give it a key pair with `fedvec rotate-key`",
                "bad_signature",
            )
        else:
            ok = hmac_verify(hmac_key, update.signature, *fields)
        if not ok:
            raise RejectedUpdate(
                f"signature does not match: not signed with client {update.client_id}'s "
                "key, or the row was changed after signing",
                "bad_signature",
            )
