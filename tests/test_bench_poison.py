"""`fedvec bench poison --quick` (what `make bench-poison-quick` runs): 4 honest demo
clients and one poisoned client on the real model, one round of one step, fedbip. The
structure of the result, each planted update quarantined with screening on and aggregated
with it off, and the honest clients' adapters and accuracy in (b) exactly those of (a).
No accuracy thresholds: at this budget they mean nothing. About 1-2 minutes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from services.bench.poison import ATTACKS, QUICK, poison_clients
from services.cli import cli
from services.processes import settings_env
from services.settings import load_settings

pytestmark = pytest.mark.slow


def test_quick_poison_bench_screened_run_matches_the_honest_run(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(home=str(tmp_path))
    result = CliRunner().invoke(
        cli,
        ["bench", "poison", "--quick", "--json", "--out", str(tmp_path / "poison")],
        env=settings_env(settings),
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    assert data["plan"]["honest"] == QUICK.honest and data["plan"]["rounds"] == QUICK.rounds
    names = [c["name"] for c in data["clients"]]
    assert len(names) == len(set(names)) == QUICK.honest and data["victim"] == names[0]
    assert [r["strategy"] for r in data["results"]] == list(QUICK.strategies)
    reasons = {"scaled": "norm_outlier", "flipped": "sign_flipped"}
    for res in data["results"]:
        assert set(res["attacks"]) == set(ATTACKS)
        for attack, entry in res["attacks"].items():
            a, b, c = (entry["runs"][k] for k in "abc")
            for run in (a, b, c):
                assert set(run["accuracy"]) == set(names)
                assert all(0 <= v <= 1 for v in run["accuracy"].values())
                assert run["min_accuracy"] <= run["mean_accuracy"]
                # every honest client got a personalized adapter each round
                assert len(run["honest_adapters"]) == QUICK.honest * QUICK.rounds
            assert a["attack"] is None and a["attacker_updates"] == 0 and a["quarantined"] == 0
            # screening on: the poisoned update of every round quarantined, never aggregated
            assert b["attacker_updates"] == QUICK.rounds == b["quarantined"]
            assert b["quarantine_reasons"] == [reasons[attack]]
            assert b["attacker_aggregated"] == 0
            # ... and the honest clients' adapters, so their accuracy, are those of (a)
            assert entry["b_vs_a"]["identical"], entry["b_vs_a"]
            assert entry["b_vs_a"]["total"] == QUICK.honest * QUICK.rounds
            assert b["accuracy"] == a["accuracy"]
            # screening off: the same updates are aggregated
            assert c["screening"] is False and c["quarantined"] == 0
            assert c["attacker_aggregated"] == c["attacker_updates"] == QUICK.rounds
            if attack == "scaled":
                # the 50x copy shares its victim's group: the victim's adapter moves
                assert not entry["c_vs_a"]["identical"]


def test_honest_clients_share_tasks_with_disjoint_records(tmp_path):
    from services.client_data import load_examples

    clients = poison_clients(tmp_path, 10, 8, 4, seed=0)
    assert len(clients) == 10
    assert [c.name for c in clients[:2]] == ["news-a-1", "news-b-1"]
    assert clients[6].name == "news-a-2" and clients[6].task == clients[0].task
    prompts = [
        ex.prompt for c in clients for p in (c.train_path, c.test_path) for ex in load_examples(p)
    ]
    assert len(prompts) == len(set(prompts)) == 10 * (8 + 4)
