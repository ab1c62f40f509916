"""The database tables (SQLAlchemy 2). Changes go through Alembic migrations in
`schema/migrations/versions`, never `create_all`."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UpdateStatus(StrEnum):
    """An update's life: REQUESTED (the server sent the train request) -> STORED (the
    aggregator verified the worker's report) -> AGGREGATED | REJECTED | QUARANTINED (a
    likely poisoned update, kept apart) | SUPERSEDED (a newer update of its client was
    aggregated first); REQUESTED -> FAILED: the worker gave up (no objects referenced);
    STORED | AGGREGATED -> WITHDRAWN: its client was removed (`fedvec remove`).
    A StrEnum: the column holds the plain string, and members compare equal to it."""

    REQUESTED = "requested"
    STORED = "stored"
    AGGREGATED = "aggregated"
    SUPERSEDED = "superseded"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    WITHDRAWN = "withdrawn"


# the statuses an update keeps for good (nothing more happens to it)
FINAL_STATUSES = tuple(
    s for s in UpdateStatus if s not in (UpdateStatus.REQUESTED, UpdateStatus.STORED)
)


class RoundStatus(StrEnum):
    TRAINING = "training"
    AGGREGATED = "aggregated"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON, datetime: DateTime(timezone=True)}


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    task: Mapped[str] = mapped_column(String(128), default="")
    site: Mapped[str] = mapped_column(String(128), default="default")
    # Where the site's workers read the private data; the server never copies it.
    data_path: Mapped[str] = mapped_column(Text)
    test_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer)
    num_test_examples: Mapped[int] = mapped_column(Integer, default=0)
    # Ed25519 public key (hex) that updates are verified with (services/signing.py); the
    # private key stays at the client's site
    public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # HMAC clients, until `fedvec rotate-key`: signing.hmac_key(secret), which is also the
    # key. Neither column: enrolled before signing existed (unsigned updates)
    secret_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    # `fedvec remove`: its keys are cleared, its reports refused, its updates withdrawn from
    # every aggregate; the row stays, with its history
    removed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Round(Base):
    """A synchronous round: its participants train once, then the aggregator personalizes."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participants: Mapped[list[int]] = mapped_column(JSON)
    strategy: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=RoundStatus.TRAINING.value)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    aggregated_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Update(Base):
    """One client fine-tune. `id` orders updates; `uid` is the id in events and logs."""

    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), index=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), nullable=True)
    base_version: Mapped[int] = mapped_column(Integer)  # θ̄ version it started from
    status: Mapped[str] = mapped_column(String(16), index=True)  # an UpdateStatus
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    task_vector_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    task_vector_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    task_vector_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    # count sketch of τ (float32 little-endian, aggregator/sketch.py), written by the worker
    sketch: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # by the worker over client id, uid and both sha256 (services/signing.py): Ed25519
    # (128 hex) or, for a client not yet rotated, HMAC-SHA256 (64 hex)
    signature: Mapped[str | None] = mapped_column(String(128), nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    aggregated_at: Mapped[datetime | None] = mapped_column(nullable=True)

    __table_args__ = (Index("ix_updates_round_client", "round_id", "client_id"),)


class SimilarityEdge(Base):
    """The similarity index: how alike two clients' task vectors are (`cosine`, smoothed over
    their updates; `update_cosine`, of their latest task vectors alone). Both directions
    are stored so "neighbours of client i" is one indexed range scan."""

    __tablename__ = "similarity_edges"

    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    peer_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    cosine: Mapped[float] = mapped_column(Float)
    update_cosine: Mapped[float] = mapped_column(Float)
    raw_cosine: Mapped[float | None] = mapped_column(Float, nullable=True)
    layer_cosines: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    peer_update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Grouping(Base):
    """One version of the client groups."""

    __tablename__ = "groupings"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    strategy: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    num_groups: Mapped[int] = mapped_column(Integer)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GroupMember(Base):
    __tablename__ = "group_members"

    version: Mapped[int] = mapped_column(ForeignKey("groupings.version"), primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    group_index: Mapped[int] = mapped_column(Integer)


class PersonalizedAdapter(Base):
    """θ̄_i, version v >= 1 (version 0 is the shared initial adapter)."""

    __tablename__ = "personalized_adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"))
    version: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(64))
    # update ids whose task vectors went into it, with their weights
    sources: Mapped[dict[str, Any]] = mapped_column(JSON)
    trigger_update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("client_id", "version"),)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), index=True)
    adapter_version: Mapped[int] = mapped_column(Integer)
    # the score: accuracy for multiple-choice tasks, ROUGE-L F1 for generation tasks
    metric: Mapped[str] = mapped_column(String(16), default="accuracy", server_default="accuracy")
    # None when the worker could not score it: then `reason` says why
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # mean recall over the gold answers (multiple choice; None for generation): a skewed
    # test split cannot flatter a model that always gives its majority answer
    balanced_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProcessedEvent(Base):
    """Event ids the aggregator has handled: a redelivered event changes nothing."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    update_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    processed_at: Mapped[datetime] = mapped_column(default=utcnow)
