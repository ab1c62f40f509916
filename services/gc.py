"""Garbage collection of orphaned objects (`fedvec gc`).

Workers and the aggregator write objects first and the database row that references them
after, so a process killed between the two leaves objects no row points to. Nothing reads
them, but they take space. They are found by listing the per-client objects (`clients/`)
and subtracting every key a row references: a personalized adapter's key, and everything
under an update's prefix (adapter, task vector, sketch, report) while its row is not
`failed` (a `requested` one may be uploading now; a failed worker deletes its objects).

An unreferenced object is not necessarily garbage: it may belong to a task that is
uploading or about to commit its row right now. Only objects older than a grace period
are orphans, and just before each deletion the object and the database are checked again.
Global objects (the initial adapter, the adapter config) are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from schema.models import PersonalizedAdapter, Update, UpdateStatus
from services.adapter_store import report_key
from services.context import object_store
from services.db import session_scope
from services.object_store import ObjectInfo, ObjectStore, ObjectStoreError
from services.settings import Settings

log = logging.getLogger(__name__)

# Only per-client objects are ever collected; everything else (global/...) is left alone.
GC_PREFIX = "clients/"
DEFAULT_GRACE_S = 3600.0

Clock = Callable[[], datetime]

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in "3600", "90s", "30m", "1h", "1.5h", "2d" or "1w"; ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number of seconds or one with a unit "
            "s, m, h, d or w (e.g. 3600, 30m, 1h, 2d)"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def format_duration(seconds: float) -> str:
    """For people: the two largest units, as in "2d 3h", "1h 5m", "4m 10s" or "12s"."""
    s = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Orphan:
    key: str
    size: int
    age_s: float
    # as listed: a different time at deletion means the key was written again meanwhile
    last_modified: datetime


@dataclasses.dataclass
class DeleteResult:
    deleted: list[Orphan] = dataclasses.field(default_factory=list)
    # (key, why) of orphans found referenced or rewritten at the last check
    kept: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # (key, error) of deletions the store refused
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GcSummary:
    older_than_s: float
    dry_run: bool
    scanned: int  # objects under clients/
    referenced: int
    fresh: int  # unreferenced but younger than the grace period: possibly in flight
    orphans: list[Orphan]
    result: DeleteResult = dataclasses.field(default_factory=DeleteResult)

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)

    @property
    def deleted_bytes(self) -> int:
        return sum(o.size for o in self.result.deleted)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "older_than_s": self.older_than_s,
            "scanned": self.scanned,
            "referenced": self.referenced,
            "fresh": self.fresh,
            "orphan_count": len(self.orphans),
            "orphan_bytes": self.orphan_bytes,
            "orphans": [
                {"key": o.key, "size": o.size, "age_s": round(o.age_s, 3)} for o in self.orphans
            ],
            "deleted": len(self.result.deleted),
            "deleted_bytes": self.deleted_bytes,
            "kept": [{"key": k, "reason": why} for k, why in self.result.kept],
            "failed": [{"key": k, "error": err} for k, err in self.result.failed],
        }


def _utcnow() -> datetime:
    return datetime.now(UTC)


_UPDATE_OBJECT = re.compile(r"^clients/\d+/updates/([^/]+)/")


def update_uid_of(key: str) -> str | None:
    """The update a key belongs to (adapter_store.update_prefix), if any."""
    m = _UPDATE_OBJECT.match(key)
    return m.group(1) if m else None


class References:
    """What rows point to: personalized adapters' keys, and updates by uid. Every object of
    an update is referenced while its row is neither `failed` nor `requested`; a
    `requested` update's objects only once its report is stored (the update is complete,
    and the aggregator's recovery pass will take it): before that they are a worker's
    upload, in flight if young, left by a killed worker if old."""

    def __init__(self, keys: set[str], updates: set[str], requested: dict[str, int]) -> None:
        self.keys = keys
        self.updates = updates
        self.requested = requested  # uid -> client id
        self.listed: set[str] = set()  # the keys the store listed

    def __contains__(self, key: str) -> bool:
        uid = update_uid_of(key)
        if key in self.keys or uid in self.updates:
            return True
        return uid in self.requested and report_key(self.requested[uid], uid) in self.listed


def referenced_keys(db_url: str) -> References:
    with session_scope(db_url) as s:
        keys = set(s.scalars(select(PersonalizedAdapter.key)))
        done = (UpdateStatus.FAILED, UpdateStatus.REQUESTED)
        live = set(s.scalars(select(Update.uid).where(Update.status.not_in(done))))
        requested = select(Update.uid, Update.client_id).where(
            Update.status == UpdateStatus.REQUESTED
        )
        return References(keys, live, dict(s.execute(requested).tuples().all()))


def is_referenced(db_url: str, key: str, store: ObjectStore) -> bool:
    """One key, asked afresh (a new transaction sees rows committed since the scan)."""
    uid = update_uid_of(key)
    with session_scope(db_url) as s:
        if uid is not None:
            row = s.scalars(select(Update).where(Update.uid == uid).limit(1)).first()
            if row is None or row.status == UpdateStatus.FAILED:
                return False
            if row.status != UpdateStatus.REQUESTED:
                return True
            return store.exists(report_key(row.client_id, uid))
        hit = s.scalar(
            select(PersonalizedAdapter.id).where(PersonalizedAdapter.key == key).limit(1)
        )
        return hit is not None


def _scan(
    settings: Settings, older_than_s: float, clock: Clock
) -> tuple[list[ObjectInfo], References, list[Orphan]]:
    store = object_store(settings)
    # List before reading the references: a row committed in between is then seen, and
    # its objects are not taken for orphans (objects are always written before their row).
    infos = store.list_info(GC_PREFIX)
    refs = referenced_keys(settings.resolved_database_url)
    refs.listed = {i.key for i in infos}
    now = clock()
    orphans = []
    for info in infos:
        if info.key in refs:
            continue
        age = (now - info.last_modified).total_seconds()
        if age >= older_than_s:
            orphans.append(Orphan(info.key, info.size, age, info.last_modified))
    return infos, refs, orphans


def find_orphans(
    settings: Settings, older_than_s: float = DEFAULT_GRACE_S, *, clock: Clock = _utcnow
) -> list[Orphan]:
    """Objects under clients/ that no row references, written at least `older_than_s`
    seconds ago (by `clock`), sorted by key. Reads only."""
    return _scan(settings, older_than_s, clock)[2]


def _current(store: ObjectStore, key: str) -> ObjectInfo | None:
    return next((i for i in store.list_info(key) if i.key == key), None)


def delete_orphans(
    settings: Settings,
    orphans: Iterable[Orphan],
    older_than_s: float = DEFAULT_GRACE_S,
    *,
    clock: Clock = _utcnow,
) -> DeleteResult:
    """Delete what `find_orphans` found, each after a last check: the object must still be
    the one listed and still older than the grace period (it may have been written again
    by a redelivered task), and still unreferenced (its row may have been committed since)."""
    store = object_store(settings)
    db_url = settings.resolved_database_url
    result = DeleteResult()
    for orphan in orphans:
        key = orphan.key
        if not key.startswith(GC_PREFIX):
            result.kept.append((key, "not a per-client object"))
            continue
        try:
            # Object first, database last: a writer commits its row after the object, so
            # the later the reference check, the more commits it sees.
            info = _current(store, key)
            if info is None:
                result.kept.append((key, "already gone"))
                continue
            if info.last_modified != orphan.last_modified:
                result.kept.append((key, "written again since the scan"))
                continue
            if (clock() - info.last_modified).total_seconds() < older_than_s:
                result.kept.append((key, "younger than the grace period"))
                continue
            if is_referenced(db_url, key, store):
                result.kept.append((key, "referenced by a row committed since the scan"))
                continue
            store.delete(key)
        except ObjectStoreError as exc:
            log.warning("could not delete orphan %s: %s", key, exc)
            result.failed.append((key, str(exc)))
            continue
        log.info(
            "deleted orphan %s (%d bytes, %s old)",
            key,
            info.size,
            format_duration(orphan.age_s),
        )
        result.deleted.append(dataclasses.replace(orphan, size=info.size))
    return result


def collect(
    settings: Settings,
    older_than_s: float = DEFAULT_GRACE_S,
    delete: bool = False,
    *,
    clock: Clock = _utcnow,
) -> GcSummary:
    """Find orphans and, when `delete`, delete them (see `delete_orphans`); a dry run
    only reads."""
    infos, refs, orphans = _scan(settings, older_than_s, clock)
    referenced = sum(1 for i in infos if i.key in refs)
    summary = GcSummary(
        older_than_s=older_than_s,
        dry_run=not delete,
        scanned=len(infos),
        referenced=referenced,
        fresh=len(infos) - referenced - len(orphans),
        orphans=orphans,
    )
    if delete:
        summary.result = delete_orphans(settings, orphans, older_than_s, clock=clock)
    return summary
