"""Typed messages passed on the queues (as JSON). `from_dict` refuses anything that is
not exactly the message, so a malformed message fails loudly at the consumer."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Self


class InvalidMessage(ValueError):
    pass


def new_id() -> str:
    return str(uuid.uuid4())


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
    "float": (float, int),
    "float | None": (float, int, type(None)),
    "bool": (bool,),
}


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise InvalidMessage(f"{cls.kind}: expected an object, got {type(data).__name__}")
        if data.get("kind") != cls.kind:
            raise InvalidMessage(f"expected kind {cls.kind!r}, got {data.get('kind')!r}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"kind"}
        if unknown:
            raise InvalidMessage(f"{cls.kind}: unknown fields {sorted(unknown)}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                raise InvalidMessage(f"{cls.kind}: missing field {f.name!r}")
            value = data[f.name]
            allowed = _TYPES[str(f.type)]
            # bool is an int subclass; never a valid id or count here
            wrong_bool = isinstance(value, bool) and bool not in allowed
            if wrong_bool or not isinstance(value, allowed):
                raise InvalidMessage(
                    f"{cls.kind}: field {f.name!r} has type {type(value).__name__}"
                )
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class TrainRequest(Message):
    """Worker queue: fine-tune a client from the personalized adapter the server names.

    Everything the worker needs comes in the message (services/operations.train_request),
    so that it reads nothing of the server's database: the client's data file at its site,
    the adapter to start from (its object key and sha256; none for the shared initial one)
    and whether the server verifies this client's signatures (a worker without its key then
    refuses before training)."""

    kind: ClassVar[str] = "train.requested"
    client_id: int
    client_name: str
    data_path: str
    base_version: int
    base_key: str
    base_sha256: str | None
    signed: bool
    round_id: int | None = None
    request_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class EvaluateRequest(Message):
    """Worker queue: score the personalized adapter the server names on the client's test
    split (services/operations.evaluate_request)."""

    kind: ClassVar[str] = "evaluate.requested"
    client_id: int
    client_name: str
    test_path: str
    base_version: int
    base_key: str
    base_sha256: str | None
    signed: bool
    max_examples: int = 0  # 0: the whole test split
    request_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class Report(Message):
    """What a site reports, signed with its client's key: the signature covers every field
    but itself and the event id (a redelivery may carry a new event id)."""

    def signed_bytes(self) -> bytes:
        fields = {k: v for k, v in self.to_dict().items() if k not in ("signature", "event_id")}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class UpdateReported(Report):
    """Aggregator queue, from a worker: an update's objects are in the store (under the
    keys adapter_store.update_keys names); everything the server records of it. The
    aggregator checks it against the request it recorded and the client's key before it
    writes anything."""

    kind: ClassVar[str] = "update.reported"
    update_uid: str
    client_id: int
    round_id: int | None
    base_version: int
    adapter_sha256: str
    task_vector_sha256: str
    sketch_sha256: str | None  # None: sketches are off (FEDVEC_SKETCH_DIM=0)
    task_vector_norm: float
    num_examples: int
    steps: int
    train_loss: float | None
    duration_s: float
    worker: str
    signature: str | None  # None: the client was enrolled before signing existed
    event_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class UpdateStored(Message):
    """Aggregator queue, from the server side (recovery, benchmarks): an update's row is
    `stored` and its objects are in place; aggregate it."""

    kind: ClassVar[str] = "update.stored"
    update_uid: str
    client_id: int
    round_id: int | None
    event_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class UpdateFailed(Message):
    """Aggregator queue: a worker gave up on a training request (the round must not wait
    for it forever). Unsigned: a worker may fail for want of the key; an update id is a
    random uuid only the request's own site queue carried, so no other site can name it."""

    kind: ClassVar[str] = "update.failed"
    update_uid: str
    client_id: int
    round_id: int | None
    reason: str
    event_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class EvaluationReported(Report):
    """Aggregator queue, from a worker: the score of a client's adapter on its test split,
    or why it could not be scored (`reason` set, the scores None)."""

    kind: ClassVar[str] = "evaluation.reported"
    evaluation_uid: str
    client_id: int
    adapter_version: int
    metric: str
    accuracy: float | None
    balanced_accuracy: float | None
    loss: float | None
    num_examples: int
    reason: str | None
    signature: str | None
    event_id: str = field(default_factory=new_id)


Event = UpdateReported | UpdateStored | UpdateFailed | EvaluationReported
EVENTS: dict[str, type[Message]] = {
    m.kind: m for m in (UpdateReported, UpdateStored, UpdateFailed, EvaluationReported)
}


def parse_event(data: Any) -> Event:
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in EVENTS:  # a list or dict is unhashable
        raise InvalidMessage(f"unknown event kind {kind!r}")
    return EVENTS[kind].from_dict(data)  # type: ignore[return-value]
