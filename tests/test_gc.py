"""`fedvec gc`: orphaned objects (written by a task killed before its row was committed)
are found and deleted; referenced, in-flight and global objects never are. On both
deployments: SQLite + local folder, PostgreSQL + S3 server."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from schema.models import Client, PersonalizedAdapter, Update
from services import adapter_store as ads
from services.cli import cli
from services.context import object_store
from services.db import session_scope
from services.gc import (
    Orphan,
    collect,
    delete_orphans,
    find_orphans,
    format_bytes,
    format_duration,
    parse_duration,
)
from services.object_store import LocalFolderStore, ObjectStore, S3Store
from services.processes import settings_env
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

GLOBAL_KEYS = (ads.INITIAL_ADAPTER_KEY, ads.ADAPTER_CONFIG_KEY)
HOUR = 3600.0


def later(hours: float = 2.0):
    """A clock `hours` ahead: everything written so far looks that old."""
    return lambda: datetime.now(UTC) + timedelta(hours=hours)


@pytest.fixture
def settings(backend_settings):
    return backend_settings


class World:
    """Objects and rows written the way workers and the aggregator write them."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.db = settings.resolved_database_url
        self.store: ObjectStore = object_store(settings)
        for key in GLOBAL_KEYS:
            self.store.put(key, b"global")
        with session_scope(self.db) as s:
            c = Client(name="alice", task="t", data_path="/nowhere", num_examples=1)
            s.add(c)
            s.flush()
            self.client_id = c.id

    def upload(self, uid: str | None = None) -> tuple[str, list[str]]:
        """A worker's objects of one update, before its row: (uid, keys)."""
        uid = uid or str(uuid.uuid4())
        keys = list(ads.update_keys(self.client_id, uid))
        for key in keys:
            self.store.put(key, b"x" * 100)
        return uid, keys

    def commit(self, uid: str, status: str = "stored") -> int:
        adapter_key, tv_key = ads.update_keys(self.client_id, uid)
        with session_scope(self.db) as s:
            row = Update(
                uid=uid,
                client_id=self.client_id,
                base_version=0,
                status=status,
                adapter_key=adapter_key,
                task_vector_key=tv_key,
            )
            s.add(row)
            s.flush()
            return row.id

    def personalized(self, version: int, trigger: int, commit: bool = True) -> str:
        key = ads.personalized_key(self.client_id, version)
        self.store.put(key, b"p" * 50)
        if commit:
            with session_scope(self.db) as s:
                s.add(
                    PersonalizedAdapter(
                        client_id=self.client_id,
                        version=version,
                        key=key,
                        sha256="0" * 64,
                        strategy="fedbip",
                        sources={},
                        trigger_update_id=trigger,
                    )
                )
        return key


@pytest.fixture
def world(settings) -> World:
    return World(settings)


def test_orphans_listed_by_dry_run_then_deleted(world: World) -> None:
    stored_uid, stored_keys = world.upload()
    stored_id = world.commit(stored_uid)
    rejected_uid, rejected_keys = world.upload()
    world.commit(rejected_uid, status="rejected")  # referenced whatever its status
    kept_personal = world.personalized(1, stored_id)
    _, killed_keys = world.upload()  # the worker was killed before its row: orphans
    lost_personal = world.personalized(2, stored_id, commit=False)  # aggregator killed
    # requested by the server: complete (its report stored, its event on its way) ...
    reported_uid, reported_keys = world.upload()
    reported_keys.append(ads.report_key(world.client_id, reported_uid))
    world.store.put(reported_keys[-1], b"{}")
    world.commit(reported_uid, status="requested")
    # ... or a killed worker's upload, no report; and a failed update's leftovers
    pending_uid, pending_keys = world.upload()
    world.commit(pending_uid, status="requested")
    failed_uid, failed_keys = world.upload()
    world.commit(failed_uid, status="failed")
    orphan_keys = sorted([*killed_keys, lost_personal, *pending_keys, *failed_keys])
    referenced = [*stored_keys, *rejected_keys, kept_personal, *reported_keys]

    dry = collect(world.settings, HOUR, delete=False, clock=later())
    assert dry.dry_run
    assert [o.key for o in dry.orphans] == orphan_keys
    assert dry.orphan_bytes == 6 * 100 + 50
    assert all(o.age_s >= 2 * HOUR - 60 for o in dry.orphans)
    scanned = len(referenced) + len(orphan_keys)
    assert (dry.scanned, dry.referenced, dry.fresh) == (scanned, len(referenced), 0)
    assert dry.result.deleted == []
    for key in [*orphan_keys, *referenced, *GLOBAL_KEYS]:
        assert world.store.exists(key), key

    done = collect(world.settings, HOUR, delete=True, clock=later())
    assert sorted(o.key for o in done.result.deleted) == orphan_keys
    assert done.deleted_bytes == 650
    assert done.result.kept == [] and done.result.failed == []
    for key in orphan_keys:
        assert not world.store.exists(key), key
    for key in [*referenced, *GLOBAL_KEYS]:
        assert world.store.exists(key), key
    assert find_orphans(world.settings, HOUR, clock=later()) == []


def test_global_keys_are_never_collected(world: World) -> None:
    # even with no grace at all and a clock a year ahead
    summary = collect(world.settings, 0, delete=True, clock=later(24 * 365))
    assert summary.scanned == 0 and summary.orphans == []
    for key in GLOBAL_KEYS:
        assert world.store.exists(key)
    # nor when a hand-made orphan list names one
    forged = Orphan(ads.INITIAL_ADAPTER_KEY, 6, 1e9, datetime.now(UTC) - timedelta(days=9))
    result = delete_orphans(world.settings, [forged], HOUR, clock=later())
    assert result.deleted == [] and world.store.exists(ads.INITIAL_ADAPTER_KEY)


def test_fresh_unreferenced_objects_are_kept(world: World) -> None:
    _, in_flight = world.upload()  # uploading now; its row comes next
    summary = collect(world.settings, HOUR, delete=True)
    assert summary.orphans == [] and summary.result.deleted == []
    assert (summary.scanned, summary.referenced, summary.fresh) == (2, 0, 2)
    assert all(world.store.exists(k) for k in in_flight)


def test_row_committed_between_scan_and_delete_saves_objects(world: World) -> None:
    uid, keys = world.upload()
    orphans = find_orphans(world.settings, HOUR, clock=later())
    assert sorted(o.key for o in orphans) == keys
    world.commit(uid)  # a slow worker commits after all
    result = delete_orphans(world.settings, orphans, HOUR, clock=later())
    assert result.deleted == []
    assert sorted(k for k, _ in result.kept) == keys
    assert all("referenced" in why for _, why in result.kept)
    assert all(world.store.exists(k) for k in keys)


def test_object_written_again_since_scan_is_kept(world: World) -> None:
    uid, keys = world.upload()
    orphans = find_orphans(world.settings, HOUR, clock=later())
    world.upload(uid)  # a redelivered task writes the same keys again, row to follow
    result = delete_orphans(world.settings, orphans, HOUR)  # real clock at the check
    assert result.deleted == [] and len(result.kept) == 2
    assert all(world.store.exists(k) for k in keys)


def test_orphan_gone_since_scan_is_not_an_error(world: World) -> None:
    _, keys = world.upload()
    orphans = find_orphans(world.settings, HOUR, clock=later())
    for key in keys:
        world.store.delete(key)
    result = delete_orphans(world.settings, orphans, HOUR, clock=later())
    assert result.deleted == [] and result.failed == []
    assert [why for _, why in result.kept] == ["already gone", "already gone"]


# --- the command -------------------------------------------------------------------------
def gc(settings, *args: str):
    result = CliRunner().invoke(
        cli, ["gc", *args], env=settings_env(settings), catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result


def test_cli_dry_run_then_delete(world: World) -> None:
    _, keys = world.upload()
    # default grace (1h): just written, so kept
    out = gc(world.settings).stdout
    assert "0 orphans" in out and "2 unreferenced but newer than 1h" in out
    assert "nothing to delete" in out

    out = gc(world.settings, "--older-than", "0").stdout
    assert all(k in out for k in keys) and "dry run: nothing deleted" in out
    assert "fedvec gc --older-than 0 --delete" in out
    assert all(world.store.exists(k) for k in keys)

    data = json.loads(gc(world.settings, "--older-than", "0", "--json").stdout)
    assert data["dry_run"] and data["orphan_count"] == 2 and data["deleted"] == 0
    assert sorted(o["key"] for o in data["orphans"]) == keys

    data = json.loads(gc(world.settings, "--older-than", "0", "--delete", "--json").stdout)
    assert not data["dry_run"] and data["deleted"] == 2 and data["deleted_bytes"] == 200
    assert not any(world.store.exists(k) for k in keys)
    assert all(world.store.exists(k) for k in GLOBAL_KEYS)


def test_cli_default_grace_deletes_only_old_orphans(embedded_settings) -> None:
    world = World(embedded_settings)
    _, old = world.upload()
    _, new = world.upload()
    assert isinstance(world.store, LocalFolderStore)
    two_hours_ago = time.time() - 2 * HOUR
    for key in old:  # as a worker killed two hours ago left them
        os.utime(os.path.join(world.store.root, *key.split("/")), (two_hours_ago,) * 2)
    out = gc(world.settings, "--delete").stdout
    assert "deleted 2 orphans (200 B)" in out
    assert "2 unreferenced but newer than 1h" in out
    assert not any(world.store.exists(k) for k in old)
    assert all(world.store.exists(k) for k in new)


def test_cli_help_and_bad_age(embedded_settings) -> None:
    help_text = CliRunner().invoke(cli, ["gc", "--help"]).output
    assert "dry run" in help_text and "--older-than" in help_text and "grace" in help_text
    result = CliRunner().invoke(
        cli, ["gc", "--older-than", "soon"], env=settings_env(embedded_settings)
    )
    assert result.exit_code == 2 and "invalid duration 'soon'" in result.output


# --- helpers and the store listing -------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400), ("2d", 172800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1h", "1x", "h", "1h30", "one hour"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_formatting() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(3600 * 26 + 120) == "1d 2h"
    assert format_duration(250) == "4m 10s"
    assert format_bytes(200) == "200 B" and format_bytes(3 * 2**20) == "3.0 MiB"


@pytest.fixture(params=["local", "s3", "s3-prefix"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalFolderStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    prefix = "deep/er" if request.param == "s3-prefix" else ""
    bucket = f"test-{uuid.uuid4().hex}"
    return S3Store(endpoint, bucket, S3_ACCESS_KEY, S3_SECRET_KEY, prefix=prefix)


def test_list_info_matches_list(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    store.put("clients/1/a", b"12345")
    store.put("clients/10/b", b"1")
    store.put("global/c", b"")
    after = datetime.now(UTC) + timedelta(seconds=5)
    infos = store.list_info("clients/1")
    assert [i.key for i in infos] == store.list("clients/1") == ["clients/1/a", "clients/10/b"]
    assert [i.size for i in infos] == [5, 1]
    assert all(before <= i.last_modified <= after for i in infos)
    assert [i.key for i in store.list_info()] == store.list()
    assert store.list_info("nothing/") == []
