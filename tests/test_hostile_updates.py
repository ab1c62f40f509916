"""Hostile update rows driven through the real aggregator (issue 7: "bad and hostile input,
each refused with a clear error; state unchanged").

A small federation (3 clients enrolled with key pairs, each with a personalized adapter
already) on the embedded backend (SQLite + local folder store). Hypothesis draws one update
for one client, sent as a site sends it (the server's `requested` row; the worker's objects,
then its signed `update.reported` event), with zero or more mutations: extra / missing
keys, wrong shapes, integer or bool dtypes, NaN / Inf values, random bytes, a truncated
file, a file over FEDVEC_MAX_ADAPTER_BYTES, a reported sha256 that is not the file's, a
file corrupted after its sha256 was reported, a missing object, an unsigned / forged /
replayed signature; and
zero or one event fault: the event naming another or an unknown client, an unknown update
id, another round, or sent twice. Properties:

- `Aggregator.handle` never raises; it answers an outcome string;
- a badly signed report is refused (`unsigned` / `bad-signature`) and its update stays
  `requested`; any other mutated update ends `rejected`, its row's reason naming one of its
  problems (or its event is refused as `mismatch` / `unknown-update`, or is a
  `duplicate`): never `aggregated`; an update without mutations ends `aggregated`;
- a refused update changes nothing else: every personalized adapter (rows and bytes), the
  similarity edges, the groupings, the other update rows, the objects in the store;
- the next honest update, of any client, is aggregated as usual.

Each example runs on a fresh copy of the same federation, so failures replay exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from sqlalchemy import select

from aggregator.service import Aggregator
from schema.events import UpdateReported
from schema.models import (
    Client,
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    SimilarityEdge,
    Update,
)
from services import adapter_store as ads
from services.context import object_store
from services.db import get_engine, session_scope, upgrade
from services.settings import Settings, load_settings
from services.signing import ED25519_PREFIX, public_key, sign_report
from tests.test_aggregator_service import KEYS, Harness, direction

# FEDVEC_HOSTILE_EXAMPLES=1000 to hunt for more; no example database (nothing written into
# the checkout)
EXAMPLES = int(os.environ.get("FEDVEC_HOSTILE_EXAMPLES", "60"))
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LIMIT = 16 * 1024  # FEDVEC_MAX_ADAPTER_BYTES here; an honest file is about 1.8 KB
N_CLIENTS = 3
# fixed private keys: hypothesis replays must sign the same bytes
KEYS_OF = [
    ED25519_PREFIX + base64.b64encode(hashlib.sha256(f"client-{i}".encode()).digest()).decode()
    for i in range(N_CLIENTS)
]
NAMES = sorted(KEYS)
FILES = ("task_vector", "adapter")

# --------------------------------------------------------------------------- the world


@dataclass
class World:
    settings: Settings
    ids: list[int]  # client ids, index i has KEYS_OF[i]

    @property
    def db(self) -> str:
        return self.settings.resolved_database_url


def _settings(home: Path) -> Settings:
    return load_settings(environ={}, dotenv=home / "no.env").replace(
        home=str(home), strategy="fedbip", group_threshold=0.2, max_adapter_bytes=LIMIT
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> World:
    """3 clients with key pairs, each with one aggregated update (personalized version 1):
    every pair has a similarity edge and there is a grouping."""
    home = tmp_path_factory.mktemp("hostile-template")
    settings = _settings(home)
    upgrade(settings.resolved_database_url)
    h = Harness(settings)
    ids = [h.client(f"client-{i}") for i in range(N_CLIENTS)]
    with session_scope(h.db) as s:
        for i, c in enumerate(ids):
            s.get(Client, c).public_key = public_key(KEYS_OF[i])
    for i, c in enumerate(ids):
        reported = h.report(c, direction(500 + i), None, key=KEYS_OF[i])
        assert h.agg.handle(reported.to_dict()) == "aggregated"
    get_engine(h.db).dispose()  # checkpoints the WAL: the folder can be copied
    return World(settings, ids)


class fresh_world:
    """A copy of the template in a folder of its own, removed afterwards."""

    def __init__(self, template: World) -> None:
        self.template = template

    def __enter__(self) -> World:
        root = Path(self.template.settings.home).parent
        self.home = Path(tempfile.mkdtemp(prefix="hostile-", dir=root))
        shutil.rmtree(self.home)
        shutil.copytree(self.template.settings.home, self.home)
        self.world = World(self.template.settings.replace(home=str(self.home)), self.template.ids)
        return self.world

    def __exit__(self, *exc: object) -> None:
        get_engine(self.world.db).dispose()
        shutil.rmtree(self.home, ignore_errors=True)


def snapshot(w: World, store) -> dict[str, Any]:
    """Everything a refused update must leave as it was (updates: by uid)."""
    with session_scope(w.db) as s:
        adapters = sorted(
            (r.client_id, r.version, r.key, r.sha256, json.dumps(r.sources, sort_keys=True))
            for r in s.scalars(select(PersonalizedAdapter))
        )
        edges = sorted(
            (
                e.client_id,
                e.peer_id,
                e.cosine,
                e.update_cosine,
                e.raw_cosine,
                json.dumps(e.layer_cosines, sort_keys=True),
                e.update_id,
                e.peer_update_id,
                str(e.updated_at),
            )
            for e in s.scalars(select(SimilarityEdge))
        )
        groupings = sorted(
            (g.version, g.num_groups, g.threshold) for g in s.scalars(select(Grouping))
        )
        members = sorted(
            (m.version, m.client_id, m.group_index) for m in s.scalars(select(GroupMember))
        )
        updates = {u.uid: (u.status, u.reason) for u in s.scalars(select(Update))}
    objects = {key: ads.sha256(store.get(key)) for key in store.list("")}
    return dict(
        adapters=adapters,
        edges=edges,
        groupings=groupings,
        members=members,
        updates=updates,
        objects=objects,
    )


def latest_adapter(w: World, client_id: int) -> PersonalizedAdapter:
    with session_scope(w.db) as s:
        row = s.scalars(
            select(PersonalizedAdapter)
            .where(PersonalizedAdapter.client_id == client_id)
            .order_by(PersonalizedAdapter.version.desc())
        ).first()
    assert row is not None  # every client has version 1 in the template
    return row


def current(w: World, store, client_id: int) -> tuple[int, dict[str, torch.Tensor]]:
    row = latest_adapter(w, client_id)
    return row.version, ads.get_state(store, row.key, max_bytes=LIMIT, expected_sha256=row.sha256)


def row_of(w: World, uid: str) -> Update:
    with session_scope(w.db) as s:
        return s.scalars(select(Update).where(Update.uid == uid)).one()


# ----------------------------------------------------------------------------- mutations


class Mutation(NamedTuple):
    kind: str
    file: str = ""  # which of the update's two files ("task_vector", "adapter"), if any
    key: str = ""
    arg: Any = None


# what the row's reason says for each (a regex); an update with several mutations must name
# at least one of them
REASONS = {
    "extra_key": r"unexpected \d+ key",
    "missing_key": r"missing \d+ key",
    "wrong_shape": r"expected shape",
    "int_dtype": r"expected a floating dtype",
    "nan": r"[1-9]\d* NaN",
    "inf": r"[1-9]\d* Inf",
    "random_bytes": r"not a valid safetensors file|missing \d+ key",
    "truncate": r"not a valid safetensors file",
    "oversize": r"over the limit of",
    "sha_mismatch": r"sha256 does not match",
    "corrupted_after": r"sha256 does not match",
    "missing_object": r"object missing",
    # refused before anything is written: no row reason, an event outcome
    "unsigned": r"^unsigned$",
    "forged": r"^bad-signature$",
    "replayed": r"^bad-signature$",
    # dtypes that are floating but not the initial adapter's float32
    "float_dtype": r"dtype",
    "float64_overflow": r"dtype|Inf|float32",
}
# applied in this order, whatever order they were drawn in (values before dtypes)
ORDER = ["missing_key", "extra_key", "wrong_shape", "nan", "inf", "float_dtype",
         "float64_overflow", "int_dtype", "oversize"]  # fmt: skip
ORDER += [k for k in REASONS if k not in ORDER]
INT_DTYPES = {
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
}

files = st.sampled_from(FILES)
keys = st.sampled_from(NAMES)
small_shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
NO_KEY, NO_ARG = st.just(""), st.none()


def mutation(
    kind: str, file: st.SearchStrategy = files, key: st.SearchStrategy = NO_KEY, arg=NO_ARG
) -> st.SearchStrategy[Mutation]:
    return st.tuples(st.just(kind), file, key, arg).map(lambda t: Mutation(*t))


def wrong_shape(key: str) -> st.SearchStrategy[Mutation]:
    return mutation(
        "wrong_shape", key=st.just(key), arg=small_shapes.filter(lambda s: s != KEYS[key])
    )


content_mutations = st.one_of(
    mutation(
        "extra_key",
        key=st.sampled_from(["base_model.model.enc.layer.2.query.lora_A.weight", "x", ""])
        | st.text(max_size=12).filter(lambda k: k not in KEYS and k != "__metadata__"),
        arg=small_shapes,
    ),
    mutation("missing_key", key=keys),
    keys.flatmap(wrong_shape),
    mutation("int_dtype", key=keys, arg=st.sampled_from(sorted(INT_DTYPES))),
    mutation("nan", key=keys, arg=st.integers(0, 63)),
    mutation("inf", key=keys, arg=st.tuples(st.integers(0, 63), st.sampled_from([1, -1]))),
    mutation("random_bytes", arg=st.binary(max_size=300)),
    mutation("truncate", arg=st.integers(0, 10_000)),
    mutation("oversize", arg=st.integers(0, 4096)),
    mutation("sha_mismatch", arg=hex64),
    mutation("corrupted_after", arg=st.tuples(st.integers(0, 10_000), st.integers(1, 255))),
    mutation("missing_object"),
    mutation("unsigned", file=st.just("")),
    # signed with another client's key, or just some hex
    mutation("forged", file=st.just(""), arg=st.integers(1, N_CLIENTS - 1) | hex64),
    mutation("replayed", file=st.just("")),  # the client's own signature, of another update
)
float_dtype_mutations = st.one_of(
    mutation("float_dtype", key=keys, arg=st.sampled_from(sorted(FLOAT_DTYPES))),
    mutation("float64_overflow", key=keys, arg=st.integers(0, 63)),
)
EVENT_FAULTS = ("none", "other_client", "unknown_client", "unknown_uid", "wrong_round", "duplicate")


@dataclass(frozen=True)
class Case:
    target: int  # index of the client the update is for
    mutations: tuple[Mutation, ...]
    event_fault: str = "none"
    seed: int = 0  # of the update's honest τ
    next_client: int = 0  # index of the client whose honest update follows


def cases(mutations: st.SearchStrategy[Mutation], min_size: int = 0) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        st.integers(0, N_CLIENTS - 1),
        st.lists(mutations, min_size=min_size, max_size=3).map(tuple),
        st.just("none") | st.sampled_from(EVENT_FAULTS[1:]),
        st.integers(0, 10**6),
        st.integers(0, N_CLIENTS - 1),
    )


def _mutate_state(state: dict[str, torch.Tensor], ms: list[Mutation]) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    for m in ms:
        if m.kind == "extra_key":
            state[m.key] = torch.zeros(m.arg)
        elif m.kind == "missing_key":
            state.pop(m.key, None)
        elif m.kind == "wrong_shape" and m.key in state:
            state[m.key] = torch.zeros(m.arg, dtype=state[m.key].dtype)
        elif m.kind in ("nan", "inf") and m.key in state and state[m.key].numel():
            index, sign_ = (m.arg, 1) if m.kind == "nan" else m.arg
            value = float("nan") if m.kind == "nan" else sign_ * float("inf")
            state[m.key].view(-1)[index % state[m.key].numel()] = value
        elif m.kind == "float_dtype" and m.key in state:
            state[m.key] = state[m.key].to(FLOAT_DTYPES[m.arg])
        elif m.kind == "float64_overflow" and m.key in state and state[m.key].numel():
            # finite in float64, beyond float32's range (≈3.4e38)
            t = state[m.key].to(torch.float64)
            t.view(-1)[m.arg % t.numel()] = 1e39
            state[m.key] = t
        elif m.kind == "int_dtype" and m.key in state:
            state[m.key] = state[m.key].to(INT_DTYPES[m.arg])
        elif m.kind == "oversize":  # a valid file, only too large
            state["pad"] = torch.zeros(LIMIT // 4 + 1 + m.arg)
    return state


STATE_KINDS = {
    "extra_key",
    "missing_key",
    "wrong_shape",
    "nan",
    "inf",
    "float_dtype",
    "float64_overflow",
    "int_dtype",
    "oversize",
}


def write_update(w: World, store, case: Case) -> UpdateReported:
    """The update as the server requests it (a `requested` row) and a (possibly hostile)
    worker stores it: objects, then its signed report, the event returned."""
    client = w.ids[case.target]
    version, base = current(w, store, client)
    tau = direction(case.seed)
    states = {"task_vector": tau, "adapter": {k: base[k] + tau[k] for k in base}}
    uid = str(uuid.uuid4())
    with session_scope(w.db) as s:
        s.add(Update(uid=uid, client_id=client, base_version=version, status="requested"))
    akey, tkey = ads.update_keys(client, uid)
    keys_of = {"adapter": akey, "task_vector": tkey}
    ms = sorted(case.mutations, key=lambda m: ORDER.index(m.kind))
    shas: dict[str, str] = {}
    for name in FILES:
        mine = [m for m in ms if m.file == name]
        state = _mutate_state(states[name], [m for m in mine if m.kind in STATE_KINDS])
        if any(m.kind in STATE_KINDS for m in mine):
            data = st_save({k: v.contiguous() for k, v in state.items()})
        else:
            data = ads.encode(state)
        for m in mine:
            if m.kind == "random_bytes":
                data = m.arg
            elif m.kind == "truncate":
                data = data[: m.arg % max(1, len(data))]
        shas[name] = recorded = ads.sha256(data)
        for m in mine:
            if m.kind == "corrupted_after":  # changed after its sha256 was recorded
                if not data:
                    data = b"\0"
                else:
                    at = m.arg[0] % len(data)
                    data = data[:at] + bytes([data[at] ^ m.arg[1]]) + data[at + 1 :]
            elif m.kind == "sha_mismatch":  # the row records another sha256
                shas[name] = m.arg if m.arg != shas[name] else "0" * 64
        corrupted = any(m.kind == "corrupted_after" for m in mine)
        if corrupted and ads.sha256(data) == recorded:  # two flips undid each other
            data += b"\0"
        if not any(m.kind == "missing_object" for m in mine):
            store.put(keys_of[name], data)
    kinds = {m.kind for m in ms}
    report = UpdateReported(
        update_uid=uid,
        client_id=client,
        round_id=None,
        base_version=version,
        adapter_sha256=shas["adapter"],
        task_vector_sha256=shas["task_vector"],
        sketch_sha256=None,
        task_vector_norm=1.0,
        num_examples=10,
        steps=1,
        train_loss=0.5,
        duration_s=0.1,
        worker="hostile",
        signature=None,
    )
    key = KEYS_OF[case.target]
    signature: str | None = sign_report(key, report.signed_bytes())
    if "unsigned" in kinds:
        signature = None
    elif "forged" in kinds:
        forged = next(m for m in ms if m.kind == "forged").arg
        if isinstance(forged, int):  # another client's key
            other = KEYS_OF[(case.target + forged) % N_CLIENTS]
            signature = sign_report(other, report.signed_bytes())
        else:
            signature = forged if forged != signature else "0" * 64
    elif "replayed" in kinds:  # the client's genuine signature of another update
        other = dataclasses.replace(report, update_uid=str(uuid.uuid4()))
        signature = sign_report(key, other.signed_bytes())
    return dataclasses.replace(report, signature=signature)


def faulty_event(w: World, case: Case, stored: UpdateReported) -> tuple[dict, str]:
    """The event with its fault, and the outcome it must get."""
    data = stored.to_dict()
    data["event_id"] = str(uuid.uuid4())  # another message, not a redelivery
    fault = case.event_fault
    if fault == "other_client":
        data["client_id"] = w.ids[(case.target + 1) % N_CLIENTS]
    elif fault == "unknown_client":
        data["client_id"] = max(w.ids) + 1000
    elif fault == "unknown_uid":
        data["update_uid"] = str(uuid.uuid4())
        return data, "unknown-update"
    elif fault == "wrong_round":
        data["round_id"] = 424242
    else:
        raise AssertionError(fault)
    return data, "mismatch"


def assert_unchanged(before: dict, after: dict, uid: str, *, status: str) -> None:
    """`after` is `before` but for the update's own row, which is now `status`."""
    for part in ("adapters", "edges", "groupings", "members", "objects"):
        assert after[part] == before[part], f"{part} changed by a refused update"
    others_before = {u: v for u, v in before["updates"].items() if u != uid}
    others_after = {u: v for u, v in after["updates"].items() if u != uid}
    assert others_after == others_before, "other update rows changed"
    assert after["updates"][uid][0] == status


def run_case(w: World, case: Case) -> None:
    store = object_store(w.settings)
    agg = Aggregator(w.settings)
    client = w.ids[case.target]
    hostile = bool(case.mutations)
    note(f"target client {client} (index {case.target}), τ seed {case.seed}")
    for m in case.mutations:
        shown = m.arg if not isinstance(m.arg, bytes) else f"<{len(m.arg)} bytes>"
        note(f"mutation: {m.kind} file={m.file} key={m.key!r} arg={shown!r}")
    note(f"event fault: {case.event_fault}")
    event("hostile" if hostile else "honest")  # --hypothesis-show-statistics
    event(f"event fault: {case.event_fault}")

    stored = write_update(w, store, case)
    uid = stored.update_uid
    before = snapshot(w, store)
    version_before = current(w, store, client)[0]

    # an event that does not match the request: refused, nothing changes, the row stays
    # requested
    if case.event_fault not in ("none", "duplicate"):
        data, expected = faulty_event(w, case, stored)
        outcome = agg.handle(data)
        note(f"faulty event -> {outcome!r}")
        assert outcome == expected
        assert_unchanged(before, snapshot(w, store), uid, status="requested")

    outcome = agg.handle(stored.to_dict())
    row = row_of(w, uid)
    note(f"event -> {outcome!r}; row {row.status!r}, reason {row.reason!r}")
    after = snapshot(w, store)
    kinds = {m.kind for m in case.mutations}
    refusal = "unsigned" if "unsigned" in kinds else "bad-signature"
    badly_signed = bool(kinds & {"unsigned", "forged", "replayed"})
    if badly_signed:  # refused at intake: nothing written at all
        assert outcome == refusal, f"a badly signed report got {outcome!r}"
        assert row.status == "requested" and row.reason is None
        assert after == before
    elif hostile:
        assert outcome == "rejected", f"a hostile update got {outcome!r}"
        assert row.status == "rejected" and row.reason
        wanted = "|".join(f"(?:{REASONS[m.kind]})" for m in case.mutations)
        assert re.search(wanted, row.reason), f"reason names none of the problems: {row.reason}"
        assert_unchanged(before, after, uid, status="rejected")
        assert current(w, store, client)[0] == version_before
    else:
        assert outcome == "aggregated"
        assert row.status == "aggregated" and row.reason is None
        assert current(w, store, client)[0] == version_before + 1
        new = ads.personalized_key(client, version_before + 1)
        assert set(after["objects"]) - set(before["objects"]) == {new}
        assert set(before["objects"]) <= set(after["objects"])
        others = [a for a in after["adapters"] if a[0] != client]
        assert others == [a for a in before["adapters"] if a[0] != client]

    # the same event again, then the same report under a new event id (a replay): nothing
    # changes
    if case.event_fault == "duplicate":
        settled = snapshot(w, store)
        again = agg.handle(stored.to_dict())
        assert again == (refusal if badly_signed else "duplicate")
        replay = dataclasses.replace(stored, event_id=str(uuid.uuid4()))
        expected = refusal if badly_signed else f"already-{row.status}"
        assert agg.handle(replay.to_dict()) == expected
        assert snapshot(w, store) == settled

    # the federation goes on: the next honest update, of any client, is aggregated
    if hostile:
        with session_scope(w.db) as s:
            used = [u for r in s.scalars(select(PersonalizedAdapter)) for u in r.sources["updates"]]
        assert uid not in used
    nxt = w.ids[case.next_client]
    v_next = current(w, store, nxt)[0]
    honest = Case(case.next_client, (), seed=case.seed + 1)
    follow = write_update(w, store, honest)
    outcome = Aggregator(w.settings).handle(follow.to_dict())  # a restarted one too
    assert outcome == "aggregated", f"the honest update after it got {outcome!r}"
    assert current(w, store, nxt)[0] == v_next + 1
    assert hostile is False or uid not in latest_adapter(w, nxt).sources["updates"]


# ------------------------------------------------------------------------------- the tests


@HOSTILE
@given(case=cases(content_mutations))
@example(case=Case(0, ()))  # honest
@example(case=Case(1, (Mutation("nan", "task_vector", NAMES[0], 3),), "duplicate"))
@example(case=Case(2, (Mutation("oversize", "adapter", arg=0),), "other_client"))
@example(case=Case(0, (Mutation("forged", arg=1),), "unknown_client"))
@example(case=Case(1, (), "unknown_uid"))
@example(case=Case(2, (), "wrong_round"))
@example(case=Case(0, (Mutation("missing_object", "adapter"), Mutation("unsigned"))))
@example(case=Case(1, (Mutation("truncate", "task_vector", arg=100),)))
@example(case=Case(0, (Mutation("corrupted_after", "task_vector", arg=(10, 1)),) * 2))
def test_hostile_update_is_refused_and_changes_nothing(template, case):
    with fresh_world(template) as w:
        run_case(w, case)


@HOSTILE
@given(case=cases(float_dtype_mutations, min_size=1))
# handle() raised "threshold_groups: similarity matrix has NaN/Inf entries" before the
# aggregator required float32
@example(case=Case(0, (Mutation("float64_overflow", "task_vector", NAMES[0], 0),)))
# was aggregated: a float16 task vector
@example(case=Case(0, (Mutation("float_dtype", "task_vector", NAMES[0], "float16"),)))
def test_float_dtypes_other_than_float32_are_rejected(template, case):
    with fresh_world(template) as w:
        run_case(w, case)
