"""Screening of an update before it can enter any aggregate (the checks themselves are pure,
in aggregator/outliers.py). One policy, `Screening.verdict`, for both ways an update gets
screened: through its own event (against the other clients' latest accepted updates), or
inside another client's aggregate while its own event is still queued (against the rest of
that aggregate). A flagged update is quarantined by the caller."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from aggregator import outliers, records
from aggregator.loader import Loaded, UpdateLoader
from aggregator.peer_index import PeerIndex
from aggregator.task_vectors import StateDict, flatten
from schema.models import Update, UpdateStatus
from services.db import session_scope
from services.settings import Settings


class Screening:
    def __init__(
        self, settings: Settings, loader: UpdateLoader, peers: PeerIndex, db_url: str
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.peers = peers
        self.db_url = db_url
        # ids of `stored` updates that passed screening in this process (dropped when they
        # are aggregated); `aggregated` ones passed it too. Only these are references for
        # the sign-flip check. After a restart, stored updates are screened again.
        self._passed: set[int] = set()

    @property
    def enabled(self) -> bool:
        return self.settings.outlier_norm_ratio > 0 or self.settings.outlier_flip_cosine > 0

    def trusted(self, update: Update) -> bool:
        """Passed screening: a reference for the sign-flip check."""
        return update.status == UpdateStatus.AGGREGATED or update.id in self._passed

    def forget(self, update_ids: Iterable[int]) -> None:
        """These updates are no longer `stored` (aggregated: trusted by status; superseded or
        quarantined: never a reference)."""
        self._passed.difference_update(update_ids)

    def verdict(
        self,
        update: Update,
        flat: torch.Tensor,
        peers: Sequence[tuple[Update, float]],
        candidates: Sequence[tuple[Update, float]],
        *,
        vector_of: Callable[[Update], torch.Tensor | None] | None = None,
        cosine_with: Mapping[int, float] | None = None,
    ) -> outliers.Outlier | None:
        """The screening policy. `flat`: the update's flat τ; `peers`: (update, ‖τ‖) of the
        updates whose median norm it is compared with; `candidates`: (update, ‖τ‖) of those
        it may be a sign-flipped copy of. A copy is of an update stored before it, at about
        its norm, and a reference must have passed screening itself. The cosine with a
        reference comes from cosine_with (update id -> cosine, already computed) or from its
        flat τ, read through vector_of one at a time: only if the norm check passes, and up
        to the first match. The update is marked as passed when nothing is found."""
        own = outliers.vector_norm(flat)
        refs = [
            (u, norm)
            for u, norm in candidates
            if u.id < update.id and self.trusted(u) and outliers.in_flip_band(own, norm)
        ]

        vectors: Iterable[tuple[int, torch.Tensor]] = ()
        scores: Iterable[tuple[int, float, float]] | None = None
        if cosine_with is not None:  # already computed: no vector is read
            scores = ((u.client_id, cosine_with[u.id], norm) for u, norm in refs)
        elif vector_of is not None:  # lazily: only if the norm check passes
            vectors = ((u.client_id, v) for u, _ in refs if (v := vector_of(u)) is not None)
        found = outliers.screen(
            flat,
            vectors,
            norm_ratio=self.settings.outlier_norm_ratio,
            flip_cosine=self.settings.outlier_flip_cosine,
            peer_norms=[norm for _, norm in peers],
            flip_scores=scores,
        )
        if found is None:
            self._passed.add(update.id)
        return found

    def screen(
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
        if not self.enabled or update.id in self._passed:
            return None, None
        candidates: list[int] | None = None
        opposed: list[Update] = []
        with session_scope(self.db_url) as s:
            if self.settings.aggregate_peers > 0:
                candidates, target_rows = self.peers.nearest(s, [update.client_id])
                peers = records.latest_accepted(s, candidates)
                row = target_rows.get(update.client_id)
                far = (
                    []
                    if row is None
                    else self.peers.opposed(row, self.settings.outlier_flip_cosine)
                )
                if far:
                    opposed = records.latest_accepted(s, far)
            else:
                peers = records.latest_accepted(s)
        peers = [u for u in peers if u.client_id != update.client_id]
        known = {u.id for u in peers}
        opposed = [u for u in opposed if u.id not in known and u.client_id != update.client_id]
        norms = {u.id: n for u in peers + opposed if (n := self._peer_norm(u)) is not None}
        found = self.verdict(
            update,
            flatten(tau),
            peers=[(u, norms[u.id]) for u in peers if u.id in norms],
            candidates=[(u, norms[u.id]) for u in peers + opposed if u.id in norms],
            vector_of=self._flat_tau,
        )
        return found, candidates

    def screen_pending(
        self, loaded: list[Loaded], vectors: torch.Tensor, cosines: torch.Tensor
    ) -> dict[int, outliers.Outlier]:
        """Updates of an aggregate not screened through their own event yet (the event is
        still queued behind others, or this process restarted), screened here against the
        rest of the aggregate, oldest first, from its flat task vectors (`vectors`, one row
        per entry of `loaded`) and their cosines: no vector is read. Returns the positions
        in `loaded` flagged, with why; a flagged one is no peer of those after it."""
        n = len(loaded)
        pending = sorted(
            (
                i
                for i, x in enumerate(loaded)
                if x.update.status == UpdateStatus.STORED and x.update.id not in self._passed
            ),
            key=lambda i: loaded[i].update.id,
        )
        if not pending or not self.enabled:
            return {}
        norms = [outliers.vector_norm(v) for v in vectors]
        flagged: dict[int, outliers.Outlier] = {}
        for i in pending:
            others = [j for j in range(n) if j != i and j not in flagged]
            row = cosines[i].tolist()
            found = self.verdict(
                loaded[i].update,
                vectors[i],
                peers=[(loaded[j].update, norms[j]) for j in others],
                candidates=[(loaded[j].update, norms[j]) for j in others],
                cosine_with={loaded[j].update.id: row[j] for j in others},
            )
            if found is not None:
                flagged[i] = found
        return flagged

    def _peer_norm(self, update: Update) -> float | None:
        """‖τ‖ of a peer: the worker's stored value, else from τ (None: τ unusable)."""
        norm = update.task_vector_norm
        if norm is not None and norm == norm and norm >= 0:
            return float(norm)
        pair = self.loader.usable(update)
        return None if pair is None else outliers.vector_norm(flatten(pair[0]))

    def _flat_tau(self, update: Update) -> torch.Tensor | None:
        """A peer's flat τ (None: τ unusable, and the update rejected)."""
        pair = self.loader.usable(update)
        return None if pair is None else flatten(pair[0])
