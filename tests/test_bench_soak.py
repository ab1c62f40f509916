"""`fedvec bench soak --quick` (what `make bench-soak-quick` runs): 200 clients push signed
synthetic updates through Redis + PostgreSQL + S3 to a real aggregator process for one
minute. Nothing may be lost, every planted bad update must end rejected, and the
aggregator's memory figures must be there (and flat). About 75 s."""

from __future__ import annotations

import json

from click.testing import CliRunner

from services.bench.soak import BAD_KINDS, QUICK, bad_kind, memory_summary, slope_per_minute
from services.cli import cli
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, redis_broker_url


def test_quick_soak_loses_nothing_and_rejects_the_planted_bad_updates(
    tmp_path, postgres_url, s3_endpoint
):
    env = {
        "FEDVEC_HOME": str(tmp_path),
        # the stack from the shared fixtures: under CI=true a missing service fails here
        "FEDVEC_DATABASE_URL": postgres_url,
        "FEDVEC_BROKER_URL": redis_broker_url(),
        "FEDVEC_S3_ENDPOINT": s3_endpoint,
        "FEDVEC_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "FEDVEC_S3_SECRET_KEY": S3_SECRET_KEY,
    }
    result = CliRunner().invoke(
        cli,
        ["bench", "soak", "--quick", "--json", "--out", str(tmp_path / "soak")],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    assert data["clients"] == QUICK.clients and data["minutes"] == QUICK.minutes
    # one warm-up update, then rate × duration at a fixed rate
    assert data["updates_in"] == 1 + round(QUICK.rate * QUICK.duration_s)
    assert data["lost"] == 0 and data["pending"] == 0 and data["send_errors"] == 0
    final = data["aggregated"] + data["rejected"] + data["quarantined"] + data["failed"]
    assert final == data["updates_in"]
    assert data["events_handled"] == data["updates_in"]  # each event handled exactly once

    planted = data["planted_bad"]
    assert set(planted) == set(BAD_KINDS)  # NaN τ, truncated file
    assert all(v["rejected"] == v["planted"] > 0 for v in planted.values())
    assert data["planted_bad_rejected"]
    bad = sum(v["planted"] for v in planted.values())
    assert data["rejected"] == bad
    assert data["aggregated"] == data["updates_in"] - bad  # every good one published

    mem = data["memory"]
    assert 0 < mem["start_mb"] <= mem["peak_mb"] and 0 < mem["end_mb"] <= mem["peak_mb"]
    assert {"growth_mb", "growth_pct", "slope_mb_per_min", "timeline_mb"} <= set(mem)
    assert mem["samples"] >= 30
    assert mem["flat"], mem
    lat = data["stored_to_personalized_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert data["aggregated_per_s"] > 0 and data["handle_s"]["capacity_updates_per_s"] > 0


def test_planted_defects_are_two_percent_and_cycle_through_every_kind():
    kinds = [bad_kind(i, QUICK) for i in range(300)]
    planted = [k for k in kinds if k]
    assert len(planted) == 6 and set(planted) == set(BAD_KINDS)


def test_memory_verdict_uses_the_baseline_after_warm_up():
    # 300 MB while warming up, then +0.5 MB a minute: flat
    samples = [(float(t), 300.0 if t < 10 else 400 + t / 120) for t in range(0, 600)]
    mem = memory_summary(samples, 10.0, None)
    assert mem["start_mb"] == 400.1 and mem["flat"]
    assert abs(mem["slope_mb_per_min"] - 0.5) < 1e-6
    # +2 MB a second after warm-up: not flat
    leaking = [(float(t), 400 + 2 * t) for t in range(0, 60)]
    mem = memory_summary(leaking, 10.0, None)
    assert not mem["flat"] and abs(slope_per_minute(leaking) - 120) < 1e-6
