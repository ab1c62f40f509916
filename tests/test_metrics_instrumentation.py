"""The process metrics move when the real code runs: object-store transfers (local folder
and S3 server), the aggregator handling events, a worker's fine-tune, and the task outcome
counters that Celery's signals drive. Metrics are process-global, so every check compares
a value before and after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery import Celery, Task
from prometheus_client import REGISTRY

from services import metrics
from services import operations as ops
from services.celery_app import retry_or_fail
from services.object_store import ObjectStore
from tests import test_causal_lm as causal
from tests.test_aggregator_service import Harness, direction, mix


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("backend", ["local_store", "s3_store"])
def test_object_store_transfers_are_counted_and_timed(backend: str, request, tmp_path: Path):
    store: ObjectStore = request.getfixturevalue(backend)
    before = {
        op: (
            value("fedvec_object_store_bytes_total", operation=op),
            value("fedvec_object_store_seconds_count", operation=op),
        )
        for op in ("put", "get")
    }
    store.put("a/b.bin", b"x" * 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * 3000)
    store.put_file("a/c.bin", big)
    assert store.get("a/b.bin") == b"x" * 1000
    store.get_file("a/c.bin", tmp_path / "back.bin")
    for op in ("put", "get"):
        moved = value("fedvec_object_store_bytes_total", operation=op) - before[op][0]
        timed = value("fedvec_object_store_seconds_count", operation=op) - before[op][1]
        assert (moved, timed) == (4000, 2), op


def test_aggregator_staleness_similarity_groups_and_rounds(embedded_settings):
    h = Harness(embedded_settings.replace(strategy="fedbip", group_threshold=0.2))
    rounds = value("fedvec_rounds_completed_total")
    sizes = value("fedvec_group_size_count"), value("fedvec_group_size_sum")
    stale = value("fedvec_update_staleness_count"), value("fedvec_update_staleness_sum")

    # a synchronous round of two families of two clients: 2 groups of 2, 12 edges
    task_a, task_b = direction(1), direction(2)
    ids = [h.client(n) for n in ("a1", "a2", "b1", "b2")]
    rid = h.round(ids)
    for c, seed, task in zip(ids, (11, 12, 13, 14), (task_a, task_a, task_b, task_b), strict=True):
        h.agg.handle(h.update(c, mix(task, direction(seed), 1, 0.3), rid).to_dict())
    assert value("fedvec_rounds_completed_total") - rounds == 1
    assert value("fedvec_groups_current") == 2
    assert value("fedvec_similarity_index_entries") == 12
    assert value("fedvec_group_size_count") - sizes[0] == 2  # one observation per group
    assert value("fedvec_group_size_sum") - sizes[1] == 4  # of 4 clients
    # each of the 4 new adapters took the 4 fresh updates, none stale
    assert value("fedvec_update_staleness_count") - stale[0] == 16
    assert value("fedvec_update_staleness_sum") - stale[1] == 0

    # asynchronous: a1 trains again; b1's round-1 update, already in b1's adapter
    # (version 1, from base 0), is one version stale when it goes into a1's new adapter
    stale = value("fedvec_update_staleness_count"), value("fedvec_update_staleness_sum")
    assert h.agg.handle(h.update(ids[0], direction(21), None).to_dict()) == "aggregated"
    assert value("fedvec_update_staleness_count") - stale[0] == 1  # only its own: peers seen
    assert value("fedvec_update_staleness_sum") - stale[1] == 0
    stale = value("fedvec_update_staleness_count"), value("fedvec_update_staleness_sum")
    assert h.agg.handle(h.update(ids[2], direction(22), None).to_dict()) == "aggregated"
    # b1's own fresh update (0) and a1's new one, already aggregated into a1's version 2 (1)
    assert value("fedvec_update_staleness_count") - stale[0] == 2
    assert value("fedvec_update_staleness_sum") - stale[1] == 1
    assert value("fedvec_rounds_completed_total") - rounds == 1  # no round there


# --- worker ---------------------------------------------------------------------------
probe_app = Celery("probe", set_as_current=False)


@probe_app.task(name="fedvec.probe", bind=True, max_retries=None)
def probe(self: Task, outcome: str) -> str:
    if outcome == "transient":  # retried by the real retry_or_fail, then failed for good
        exc = ConnectionError("store unreachable")
        retry_or_fail(self, exc, probe_app.fedvec_settings, "probe")
        raise exc
    if outcome == "bad":
        raise ValueError("bad input")
    return "ok"


def test_task_outcomes_are_counted_by_short_name(embedded_settings):
    probe_app.fedvec_settings = embedded_settings.replace(task_max_retries=1, retry_backoff_max=0)

    def counts() -> dict[str, float]:
        names = ("succeeded", "failed", "retried")
        return {o: value("fedvec_tasks_total", task="probe", outcome=o) for o in names} | {
            "retries": value("fedvec_task_retries_total", task="probe")
        }

    before = counts()
    assert probe.apply(args=["ok"]).get() == "ok"
    assert probe.apply(args=["bad"]).failed()
    # eager: the retry runs at once, and fails for good past task_max_retries=1
    assert probe.apply(args=["transient"]).failed()
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {
        "succeeded": 1,
        "failed": 2,
        "retried": 1,
        "retries": 1,
    }


@pytest.mark.slow
def test_a_fine_tune_counts_samples_and_tokens(embedded_settings, tmp_path):
    from workers.model import get_runtime
    from workers.tasks import run_training

    settings = embedded_settings.replace(batch_size=8, max_steps=1, max_length=32)
    pairs = {"the sky is": ["blue", "green"], "two plus two": ["four", "five", "six"]}
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "options": opts, "answer": opts[0]}) + "\n"
            for p, opts in pairs.items()
        )
    )
    client = ops.enroll(settings, "tiny", data)
    names = ("fedvec_finetune_samples_total", "fedvec_finetune_tokens_total")
    before = {n: value(n) for n in names} | {"runs": value("fedvec_finetune_seconds_count")}
    published: list = []
    out = run_training(settings, ops.train_request(settings, client["id"]), published.append)
    assert out["status"] == "stored" and out["steps"] == 1 and len(published) == 1
    # one step over both examples: the tokens of every (prompt, option) pair, unpadded
    tok = get_runtime(settings).tokenizer
    tokens = sum(
        len(tok(p, o, truncation="only_first", max_length=32)["input_ids"])
        for p, opts in pairs.items()
        for o in opts
    )
    assert value("fedvec_finetune_samples_total") - before[names[0]] == 2
    assert value("fedvec_finetune_tokens_total") - before[names[1]] == tokens
    assert value("fedvec_finetune_seconds_count") - before["runs"] == 1
    assert value("fedvec_finetune_samples_per_second") > 0
    assert value("fedvec_finetune_tokens_per_second") > value("fedvec_finetune_samples_per_second")


tiny_lm = causal.tiny_lm  # the module-scoped tiny random LLaMA fixture, reused


def test_a_causal_lm_fine_tune_counts_its_unpadded_sequences(tiny_lm, tmp_path):
    from workers.model import get_runtime

    runtime = get_runtime(causal.lm_settings(tiny_lm, tmp_path, max_steps=1))
    result = runtime.train(runtime.initial_adapter(), causal.COLORS, seed=0)
    seqs = [runtime._sequence(ex.prompt, ex.answer, eos=True) for ex in causal.COLORS]
    assert result.samples == 4  # one batch of all 4
    assert result.tokens == sum(len(ids) for ids, _ in seqs)


def test_build_info_names_the_installed_version():
    from importlib.metadata import version

    assert value("fedvec_build_info", version=version("fedvec")) == 1


def test_labelled_counters_start_at_zero():
    # Born at 0, so the first rejection or failure after a restart shows in rate().
    from prometheus_client import REGISTRY

    for reason in metrics.REJECT_REASONS:
        assert (
            REGISTRY.get_sample_value("fedvec_updates_rejected_total", {"reason": reason})
            is not None
        )
    assert (
        REGISTRY.get_sample_value("fedvec_tasks_total", {"task": "train", "outcome": "failed"})
        is not None
    )
