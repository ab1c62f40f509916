"""Typed messages passed on the queues (as JSON). `from_dict` refuses anything that is
not exactly the message, so a malformed message fails loudly at the consumer."""

from __future__ import annotations

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
    max_examples: int = 0  # 0: the whole test split
    request_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class UpdateStored(Message):
    """Aggregator queue: an update's adapter and task vector are in the object store and
    its row is committed."""

    kind: ClassVar[str] = "update.stored"
    update_uid: str
    client_id: int
    round_id: int | None
    event_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class UpdateFailed(Message):
    """Aggregator queue: a worker gave up on a training request (the round must not wait
    for it forever)."""

    kind: ClassVar[str] = "update.failed"
    update_uid: str
    client_id: int
    round_id: int | None
    event_id: str = field(default_factory=new_id)


EVENTS: dict[str, type[Message]] = {m.kind: m for m in (UpdateStored, UpdateFailed)}


def parse_event(data: Any) -> UpdateStored | UpdateFailed:
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in EVENTS:  # a list or dict is unhashable
        raise InvalidMessage(f"unknown event kind {kind!r}")
    return EVENTS[kind].from_dict(data)  # type: ignore[return-value]
