"""The similarity index that scales: one sketch per client, groups by sketch, exact math only
inside the updated client's group.

Per update the aggregator pays one pass over the N × k sketch matrix (the client's
similarity row), O(G · k) for the group assignment, and two passes over the (1 + m) full task
vectors of the client and its m most similar group members (exact cosines, then the
personalized aggregate). Memory: N × k for the index, (1 + m) × d for the exact step; never
N × d.

Groups use the same rule as grouping.threshold_groups (average linkage): a client joins the
group whose members it resembles most on average, if that average is >= threshold, else it
starts a new group; two groups merge when their average pairwise similarity reaches the
threshold. Keeping each group's sum of unit sketches makes "average similarity to the
members" one dot product per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aggregator.aggregation import similarity_weights
from aggregator.sketch import normalize

# m: group members in one personalized aggregate (the most similar). The exact step reads
# 1 + m full vectors twice, so it costs ∝ (1 + m)·d: at d = 4.2M on one core 24 ms for m = 8,
# 42 ms for m = 16 (`fedvec bench scale`), and 8 peers already outnumber the paper's groups.
DEFAULT_PEERS = 8
_ASSIGN_BATCH = 128  # sketches assigned per [b, k] × [k, b] product


@dataclass(frozen=True, eq=False)
class IndexUpdate:
    """What one client's new sketch did to the index."""

    client_id: int
    group: int
    previous_group: int | None  # None for a client new to the index
    # [n] float32 estimated cosine with every indexed client, in index row order
    # (SketchIndex.client_ids at the time of the update); 1.0 at the client itself.
    similarity: torch.Tensor


class SketchIndex:
    """In-memory N × k matrix of unit sketches, group labels and per-group sketch sums.

    Per group it keeps S_g, the sum of its members' unit sketches (float64, so add/remove
    cycles do not drift), and the group Gram matrix S_g · S_h: average linkage of a client
    with a group is q · S_g / n_g, of two groups S_g · S_h / (n_g n_h). A batch of B sketches
    costs the products [B, k] × [k, N] (similarity rows), [B, k] × [k, G] and [B, k] × [k, B];
    the sequential assignment after them is O(B · G) bookkeeping, exactly as if the sketches
    had come one at a time.
    """

    def __init__(self, k: int, threshold: float, *, capacity: int = 1024) -> None:
        if k <= 0:
            raise ValueError(f"sketch size must be > 0, got {k}")
        if threshold != threshold:
            raise ValueError("threshold is NaN")
        self.k = int(k)
        self.threshold = float(threshold)
        # torch.empty: rows past n are never touched, so the doubling reserve costs address
        # space, not resident memory.
        self._unit = torch.empty(max(1, capacity), self.k, dtype=torch.float32)
        self._ids: list[int] = []
        self._row: dict[int, int] = {}
        self._label: list[int] = []  # per row
        self._rows_of: dict[int, set[int]] = {}  # group -> rows
        # Groups live in slots of [slots, k] / [slots, slots] matrices; group ids only grow
        # (stable names for the database), slots are reused.
        self._sums = torch.zeros(0, self.k, dtype=torch.float64)
        self._sizes = torch.zeros(0, dtype=torch.float64)
        self._gram = torch.zeros(0, 0, dtype=torch.float64)
        self._slot: dict[int, int] = {}  # group -> slot
        self._group_at: list[int] = []  # slot -> group (-1: free)
        self._free: list[int] = []
        self._next_group = 0
        # q_b · S_slot for the batch being assigned (kept exact as groups change)
        self._p = torch.zeros(0, 0, dtype=torch.float64)

    # --- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._row

    @property
    def client_ids(self) -> list[int]:
        """Client of each index row (the order of IndexUpdate.similarity)."""
        return list(self._ids)

    def row_of(self, client_id: int) -> int:
        """The client's position in index rows (and in IndexUpdate.similarity)."""
        return self._row[client_id]

    def group_of(self, client_id: int) -> int:
        return self._label[self._row[client_id]]

    def members(self, group: int) -> list[int]:
        return sorted(self._ids[r] for r in self._rows_of.get(group, ()))

    def groups(self) -> dict[int, list[int]]:
        return {g: self.members(g) for g in sorted(self._rows_of)}

    def labels(self) -> dict[int, int]:
        return {cid: self._label[r] for cid, r in self._row.items()}

    def unit_sketch(self, client_id: int) -> torch.Tensor:
        return self._unit[self._row[client_id]].clone()

    @property
    def nbytes(self) -> int:
        """Resident bytes of the index data (used sketch rows, group sums and Gram)."""
        slots = self._sums.shape[0]
        return len(self._ids) * self.k * 4 + slots * self.k * 8 + slots * slots * 8

    def peers(self, update: IndexUpdate, m: int = DEFAULT_PEERS) -> list[int]:
        """The m members of the client's current group most similar to it by sketch (itself
        excluded), most similar first: whom the exact step compares it with."""
        me = self._row[update.client_id]
        rows = [r for r in self._rows_of[self._label[me]] if r != me]
        rows = [r for r in rows if r < update.similarity.numel()]  # joined after this row
        if not rows or m <= 0:
            return []
        idx = torch.tensor(rows, dtype=torch.int64)
        top = torch.topk(update.similarity[idx], min(m, len(rows))).indices
        return [self._ids[rows[int(i)]] for i in top]

    # --- writing ----------------------------------------------------------------------
    def update(
        self, batch: Sequence[tuple[int, torch.Tensor]], *, similarity: bool = True
    ) -> list[IndexUpdate]:
        """Put new sketches in the index and regroup their clients.

        A client that appears more than once counts with its last sketch. The similarity
        rows of the whole batch are one [B, k] × [k, N] product, taken after all new sketches
        are in, so clients of one batch see each other's new sketches. Group assignment
        is sequential in batch order (a group started by one client is there for the next),
        with the same result as updating one client at a time. similarity=False skips the
        rows (bulk loading at start-up); the returned rows are then empty.
        """
        last: dict[int, torch.Tensor] = {}
        for client_id, s in batch:
            if s.dim() != 1 or s.numel() != self.k:
                raise ValueError(f"client {client_id}: expected a sketch of size {self.k}")
            last[int(client_id)] = s
        if not last:
            return []
        ids = list(last)
        stacked = torch.stack([last[c] for c in ids]).detach().cpu()
        finite = torch.isfinite(stacked).all(dim=1)
        if not bool(finite.all()):
            bad = ids[int((~finite).nonzero()[0])]
            raise ValueError(f"client {bad}: sketch has NaN/Inf entries")
        q = normalize(stacked)
        del stacked

        # clients already indexed leave their group first (with their old sketch)
        previous: list[int | None] = []
        touched: set[int] = set()
        for client_id in ids:
            row = self._row.get(client_id)
            if row is None:
                previous.append(None)
                self._append(client_id)
            else:
                old = self._label[row]
                previous.append(old)
                if self._remove_from_group(old, row):
                    touched.add(self._slot[old])
        self._refresh_gram(touched)
        for b, client_id in enumerate(ids):
            self._unit[self._row[client_id]] = q[b]

        n = len(self._ids)
        if similarity:
            rows = q @ self._unit[:n].T  # the one pass over N × k per batch
            rows.clamp_(-1.0, 1.0)
            for b, client_id in enumerate(ids):
                rows[b, self._row[client_id]] = 1.0
        else:
            rows = torch.zeros(len(ids), 0)

        # Sub-batches bound the [B, B] product (bulk loads pass thousands of sketches).
        for a in range(0, len(ids), _ASSIGN_BATCH):
            part = ids[a : a + _ASSIGN_BATCH]
            self._reserve_slots(len(part))
            q64 = q[a : a + len(part)].to(torch.float64)
            self._p = q64 @ self._sums.T  # [b, slots]
            batch_gram = q64 @ q64.T  # [b, b]
            for b, client_id in enumerate(part):
                self._assign(self._row[client_id], b, q64[b], batch_gram)
        self._p = torch.zeros(0, 0, dtype=torch.float64)
        # read labels at the end: a later merge in this batch may relabel an earlier client
        groups = [self._label[self._row[c]] for c in ids]
        return [
            IndexUpdate(client_id=c, group=g, previous_group=p, similarity=rows[b])
            for b, (c, g, p) in enumerate(zip(ids, groups, previous, strict=True))
        ]

    def remove(self, client_id: int) -> None:
        """Drop a client (its row is filled by the last row, so rows stay dense)."""
        row = self._row.pop(client_id)
        group = self._label[row]
        if self._remove_from_group(group, row):
            self._refresh_gram({self._slot[group]})
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._unit[row] = self._unit[last]
            self._ids[row] = moved
            self._row[moved] = row
            group = self._label[last]
            self._label[row] = group
            self._rows_of[group].discard(last)
            self._rows_of[group].add(row)
        self._ids.pop()
        self._label.pop()

    # --- internals --------------------------------------------------------------------
    def _append(self, client_id: int) -> None:
        n = len(self._ids)
        if n == self._unit.shape[0]:
            grown = torch.empty(2 * n, self.k, dtype=torch.float32)
            grown[:n] = self._unit
            self._unit = grown
        self._ids.append(client_id)
        self._row[client_id] = n
        self._label.append(-1)

    def _remove_from_group(self, group: int, row: int) -> bool:
        """Take a row out of its group; True if the group is still there (its Gram row is
        then stale until _refresh_gram)."""
        self._label[row] = -1
        if group < 0:
            return False
        slot = self._slot[group]
        self._rows_of[group].discard(row)
        if self._rows_of[group]:
            self._sums[slot] -= self._unit[row].to(torch.float64)
            self._sizes[slot] -= 1
            return True
        self._drop_group(group)
        return False

    def _refresh_gram(self, slots: set[int]) -> None:
        live = [s for s in slots if self._group_at[s] >= 0]
        if not live:
            return
        idx = torch.tensor(live, dtype=torch.int64)
        fresh = self._sums[idx] @ self._sums.T  # [len, slots]
        self._gram[idx] = fresh
        self._gram[:, idx] = fresh.T

    def _reserve_slots(self, needed: int) -> None:
        """Enough free slots for `needed` new groups (matrices grow by doubling)."""
        if len(self._free) >= needed:
            return
        old = self._sums.shape[0]
        new = max(16, 2 * old, old + needed)
        sums = torch.zeros(new, self.k, dtype=torch.float64)
        sums[:old] = self._sums
        sizes = torch.zeros(new, dtype=torch.float64)
        sizes[:old] = self._sizes
        gram = torch.zeros(new, new, dtype=torch.float64)
        gram[:old, :old] = self._gram
        self._sums, self._sizes, self._gram = sums, sizes, gram
        self._group_at += [-1] * (new - old)
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def _new_group(self) -> int:
        slot = self._free.pop()
        group = self._next_group
        self._next_group += 1
        self._slot[group] = slot
        self._group_at[slot] = group
        self._rows_of[group] = set()
        return group

    def _drop_group(self, group: int) -> None:
        slot = self._slot.pop(group)
        del self._rows_of[group]
        self._sums[slot].zero_()
        self._sizes[slot] = 0
        self._gram[slot].zero_()
        self._gram[:, slot].zero_()
        if self._p.numel():
            self._p[:, slot] = 0
        self._group_at[slot] = -1
        self._free.append(slot)

    def _assign(self, row: int, b: int, q: torch.Tensor, batch_gram: torch.Tensor) -> None:
        """Client b of the batch joins its best group or a new one; merges follow."""
        group = -1
        if self._slot:
            used = self._sizes > 0
            scores = torch.where(used, self._p[b] / self._sizes.clamp(min=1), float("-inf"))
            best = int(torch.argmax(scores))
            if float(scores[best]) >= self.threshold:
                group = self._group_at[best]
        if group < 0:
            group = self._new_group()
        slot = self._slot[group]
        # S_g += q: Gram row/column g moves by q · S (= p_b), the diagonal also by |q|²
        p_b = self._p[b].clone()
        self._gram[slot] += p_b
        self._gram[:, slot] += p_b
        self._gram[slot, slot] += batch_gram[b, b]
        self._p[:, slot] += batch_gram[:, b]
        self._sums[slot] += q
        self._sizes[slot] += 1
        self._rows_of[group].add(row)
        self._label[row] = group
        self._merge(group)

    def _merge(self, group: int) -> None:
        """Merge groups into `group` while some group's average linkage with it reaches the
        threshold (as agglomerative clustering would)."""
        while len(self._slot) > 1:
            slot = self._slot[group]
            used = self._sizes > 0
            linkage = self._gram[slot] / (self._sizes.clamp(min=1) * self._sizes[slot])
            linkage = torch.where(used, linkage, float("-inf"))
            linkage[slot] = float("-inf")
            best = int(torch.argmax(linkage))
            if float(linkage[best]) < self.threshold:
                return
            other = self._group_at[best]
            # the larger group keeps its label: fewer members change
            keep, gone = (
                (group, other)
                if len(self._rows_of[group]) >= len(self._rows_of[other])
                else (other, group)
            )
            ks, gs = self._slot[keep], self._slot[gone]
            row = self._gram[ks] + self._gram[gs]
            diagonal = row[ks] + row[gs]
            self._gram[ks] = row
            self._gram[:, ks] = row
            self._gram[ks, ks] = diagonal
            self._sums[ks] += self._sums[gs]
            self._sizes[ks] += self._sizes[gs]
            self._p[:, ks] += self._p[:, gs]
            for r in self._rows_of[gone]:
                self._label[r] = keep
            self._rows_of[keep] |= self._rows_of[gone]
            self._rows_of[gone] = set()
            self._drop_group(gone)
            group = keep


# --- the exact step, inside one group ------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PersonalizedAggregate:
    """Exact result for one updated client: θ̄_new = θ̄ + delta (flattened task-vector order)."""

    rows: list[int]  # positions in `vectors`: the client first, then its peers
    cosine: torch.Tensor  # [len(rows)] float64 exact cosines with the client (1.0 first)
    weights: torch.Tensor  # [len(rows)] float64, similarity_weights (FedBip's p)
    delta: torch.Tensor  # [d] float32 = Σ weights · vectors[rows]


def _blocks(vectors: torch.Tensor | Sequence[torch.Tensor], d: int, chunk: int):
    """Yield (a, b, [M, b - a] float32 block) over the coordinates, one cache-sized block at
    a time, so each vector is read from memory once per pass and never copied whole: views
    of a [M, d] float32 tensor, or copies of the listed vectors' pieces into one buffer."""
    if isinstance(vectors, torch.Tensor) and vectors.dtype == torch.float32:
        for a in range(0, d, chunk):
            yield a, min(d, a + chunk), vectors[:, a : a + chunk]
        return
    buf = torch.empty(len(vectors), min(chunk, d), dtype=torch.float32)
    for a in range(0, d, chunk):
        b = min(d, a + chunk)
        block = buf[:, : b - a]
        for i, v in enumerate(vectors):
            block[i].copy_(v[a:b])
        yield a, b, block


def exact_aggregates(
    vectors: torch.Tensor | Sequence[torch.Tensor],
    targets: Sequence[int],
    peers: Sequence[Sequence[int]] | None = None,
    discounts: torch.Tensor | None = None,
    *,
    chunk: int = 1 << 17,
) -> list[PersonalizedAggregate]:
    """FedBip's personalized aggregate of each target over its peers, exactly.

    vectors: the full flat task vectors of a working set (the updated clients of one group
    and their peers): a [M, d] tensor (fastest: no copies) or M tensors of [d];
    targets: positions of the updated clients; peers[j]: positions target j aggregates over
    (itself excluded; default: everyone else); discounts: [M] staleness discounts
    (default 1).

    Two passes over the working set: exact cosines of every target with every vector
    (float64 across blocks), then all targets' aggregates in one [T, M] × [M, d] product.
    Weights are aggregation.similarity_weights, so the result equals
    strategies.FedBip on the same group (self weight from s = 1, negative cosines get 0).
    Memory: the caller's M × d plus T × d for the deltas and one M × chunk block.
    """
    if len(vectors) == 0:
        raise ValueError("exact_aggregates: no vectors")
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() != 2:
            raise ValueError("exact_aggregates: a tensor of vectors must be [M, d]")
        d = int(vectors.shape[1])
    else:
        d = vectors[0].numel()
        if any(v.dim() != 1 or v.numel() != d for v in vectors):
            raise ValueError("exact_aggregates: vectors must all be 1-D of the same size")
    m_all = len(vectors)
    if any(not 0 <= t < m_all for t in targets):
        raise IndexError(f"exact_aggregates: a target is out of range for {m_all} vectors")
    if peers is None:
        peers = [[i for i in range(m_all) if i != t] for t in targets]
    if len(peers) != len(targets):
        raise ValueError(f"{len(peers)} peer lists for {len(targets)} targets")
    if discounts is not None and discounts.numel() != m_all:
        raise ValueError(f"{discounts.numel()} discounts for {m_all} vectors")
    tpos = torch.tensor(list(targets), dtype=torch.int64)

    dots = torch.zeros(len(targets), m_all, dtype=torch.float64)
    sq = torch.zeros(m_all, dtype=torch.float64)
    for _, _, block in _blocks(vectors, d, chunk):
        dots += (block[tpos] @ block.T).to(torch.float64)
        sq += torch.linalg.vector_norm(block, dim=1).to(torch.float64) ** 2
    norms = sq.sqrt()
    denom = norms[tpos].unsqueeze(1) * norms.unsqueeze(0)
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1, 1)

    weights = torch.zeros(len(targets), m_all, dtype=torch.float64)
    results: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    for j, t in enumerate(targets):
        rows = [t] + [int(p) for p in peers[j] if int(p) != t]
        row_cos = cos[j, rows].clone()
        row_cos[0] = 1.0
        disc = None if discounts is None else discounts.reshape(-1)[rows]
        p = similarity_weights(row_cos, 0, disc)
        weights[j, rows] = p
        results.append((rows, row_cos, p))

    w32 = weights.to(torch.float32)
    if isinstance(vectors, torch.Tensor) and vectors.dtype == torch.float32:
        deltas = w32 @ vectors  # one pass
    else:
        deltas = torch.empty(len(targets), d, dtype=torch.float32)
        for a, b, block in _blocks(vectors, d, chunk):
            deltas[:, a:b] = w32 @ block
    return [
        PersonalizedAggregate(rows=rows, cosine=c, weights=p, delta=deltas[j])
        for j, (rows, c, p) in enumerate(results)
    ]
