"""`fedvec bench worker`: what the service costs on top of the work it does.

1. Fine-tune overhead. The same client data, steps, seed and settings, trained twice:
   by a bare loop written out here with plain transformers + peft + torch.optim.AdamW
   (what a user would write by hand, timing only training), and by fedvec: a real
   `fedvec worker` process (embedded settings: SQLite, local object folder, folder
   broker) running the train task end to end, timed from sending the request to the
   update's signed report being stored and sent. Nothing is subtracted from fedvec's
   time; its breakdown comes from the worker's own log lines and Prometheus metrics. Both
   keep the model loaded (a worker loads it once), so each is warmed with one run first.
2. Object store. Adapters of ~0.3 MiB (MiniLM's LoRA) to 64 MiB through fedvec's
   adapter_store (encode, hash, validate, decode) against raw `minio` put/get of the same
   bytes, on moto's S3 server in a child process (so that neither its CPU time nor its
   copy of the objects counts against the client); multipart (S3 ETag "-N"), which
   upload call fedvec makes, and the peak memory of moving the largest adapter.
3. GPU (when CUDA is available): samples/s and peak memory of fedvec's runtime for
   MiniLM and a ~1B LLaMA built from its config (random weights, bf16 base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from services.bench.common import MIB, minilm_lora_state, synthetic_state
from services.client_data import Example
from services.console import Echo
from services.processes import free_port
from services.settings import Settings

REPO = Path(__file__).resolve().parent.parent
FINETUNE_TARGET = 1.10  # fedvec / bare wall time
STORE_TARGET = 1.20  # fedvec / raw minio, upload + download
MULTIPART_ABOVE = 5 * MIB  # minio's minimum part size: larger objects go up in parts
MINILM_LORA = "minilm-lora"  # the adapter fedvec trains by default (r=8 on query, value)


@dataclass(frozen=True)
class WorkerBenchPlan:
    # LoRA steps per fine-tune: one epoch of the 64 examples, as in the demo's rounds
    # (on 2 CPU cores a step of 40 (prompt, option) pairs of 128 tokens takes about 2 s)
    steps: int = 8
    repeats: int = 5  # timed runs of each kind; medians are reported
    device: str = "cpu"  # of the fine-tune comparison (part 1)
    train_examples: int = 64  # of the demo client news-a
    adapter_sizes_mib: tuple[float, ...] = (16.0, 64.0)  # synthetic, besides MiniLM's LoRA
    gpu_steps: int = 20
    quick: bool = False


QUICK = WorkerBenchPlan(steps=2, repeats=1, adapter_sizes_mib=(8.0,), gpu_steps=4, quick=True)


def plan_for(
    *, quick: bool, steps: int | None, repeats: int | None, device: str
) -> WorkerBenchPlan:
    plan = QUICK if quick else WorkerBenchPlan()
    changes: dict[str, Any] = {"device": device}
    if steps is not None:
        changes["steps"] = steps
    if repeats is not None:
        changes["repeats"] = repeats
    plan = dataclasses.replace(plan, **changes)
    if plan.steps < 1 or plan.repeats < 1:
        raise ValueError("--steps and --repeats must be at least 1")
    return plan


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Progress:
    """One bar on stderr over every measurement (when stderr is a terminal), plus the
    caller's echo for the lines that carry figures."""

    def __init__(self, total: int, echo: Echo) -> None:
        from tqdm import tqdm

        self._echo = echo
        # disable=None: a bar only on a terminal; the figure lines show progress anyway
        self.bar = tqdm(
            total=total, desc="bench worker", file=sys.stderr, leave=False, disable=None
        )

    def echo(self, message: str) -> None:
        self.bar.clear()
        self._echo(message)
        self.bar.refresh()

    def step(self, what: str) -> None:
        self.bar.set_description(what)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --- 1. fine-tune overhead -------------------------------------------------------------
@dataclass
class BareModel:
    tokenizer: Any
    model: Any
    device: torch.device


def load_bare_model(settings: Settings, device: str) -> BareModel:
    """MiniLM mean-pooled into a one-score head + LoRA, the way a user would set it up by
    hand, with the settings fedvec's worker uses (so both train the same parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from workers.pair_scorer import PairScorer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar among the figures
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = PairScorer(
                AutoModel.from_pretrained(settings.model_path, add_pooling_layer=False)
            )
            if settings.base_dropout >= 0:  # fedvec's default: no dropout in the base
                for module in base.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = settings.base_dropout
            config = LoraConfig(
                r=settings.lora_r,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                target_modules=settings.target_modules,
                modules_to_save=["classifier"],  # the head is trained too
            )
            model = get_peft_model(base, config)
    finally:
        hf_logging.set_verbosity(verbosity)
    dev = torch.device(device)
    return BareModel(tokenizer, model.to(dev), dev)


def bare_train(
    bare: BareModel,
    start: dict[str, torch.Tensor],
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    seed: int,
) -> tuple[float, float, int]:
    """The hand-written loop: score each (prompt, option) pair, cross-entropy over an
    example's options, AdamW. Returns (seconds, mean loss, samples); only training is
    timed (the start adapter is loaded before the clock starts)."""
    from peft import set_peft_model_state_dict

    model, tokenizer, device = bare.model, bare.tokenizer, bare.device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in start.items()})
    model.train()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    step, samples, loss_sum = 0, 0, 0.0
    while step < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            if step >= steps:
                break
            batch = [examples[j] for j in order[i : i + batch_size]]
            enc = tokenizer(
                [ex.prompt for ex in batch for _ in ex.options],
                [option for ex in batch for option in ex.options],
                truncation="only_first",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            scores = model(**enc).logits.squeeze(-1).float()
            per_example = torch.split(scores, [len(ex.options) for ex in batch])
            loss = torch.stack(
                [
                    torch.nn.functional.cross_entropy(
                        s.unsqueeze(0), torch.tensor([ex.label], device=device)
                    )
                    for s, ex in zip(per_example, batch, strict=True)
                ]
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            samples += len(batch)
            loss_sum += float(loss.detach())  # a user logs the loss: one sync a step
    seconds = time.perf_counter() - t0
    model.eval()
    return seconds, loss_sum / max(step, 1), samples


def _scrape(url: str) -> dict[str, float]:
    """The worker's cumulative fine-tune and object-store seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedvec_finetune_seconds_sum":
                out["train"] = sample.value
            elif sample.name == "fedvec_object_store_seconds_sum":
                out["store_" + sample.labels.get("operation", "")] = sample.value
    return out


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _log_times(log_path: Path, uid: str) -> dict[str, float]:
    """When the worker received the task, began training and had committed the update
    row (its log lines: local time, millisecond resolution, the clock of this process)."""
    received: float | None = None
    out: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "fedvec.train[" in line and "] received" in line:
            received = t
        elif f"update={uid} training from" in line:
            if received is not None:
                out["received"] = received
            out["training"] = t
        elif f"update={uid} stored:" in line:  # logged once the report is sent
            out["stored"] = t
    return out


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_update(
    home: Path,
    client_id: int,
    uid: str,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float,
) -> dict[str, Any]:
    """The worker's stored report of the update (its last write before it sends the event;
    no aggregator runs here), polled every 50 ms (light enough not to slow the worker)."""
    from services import adapter_store as ads

    report = home / "objects" / ads.report_key(client_id, uid)
    deadline = time.monotonic() + timeout
    while True:
        if report.is_file():
            data = json.loads(report.read_text())
            return {
                "stored_at": report.stat().st_mtime,
                "duration_s": float(data["duration_s"]),
                "loss": float(data["train_loss"] or 0.0),
                "steps": int(data["steps"]),
            }
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}):\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no stored update after {timeout:.0f}s:\n{_log_tail(log_path)}")
        time.sleep(0.05)


class BareProcess:
    """The bare loop in a fresh Python process of its own, as a user's script would run:
    the worker is a process too, so neither side carries the benchmark's own state
    (its objects, threads, allocator history) into the comparison."""

    def __init__(
        self, settings: Settings, data: Path, *, steps: int, seed: int, log_dir: Path
    ) -> None:
        from services.processes import settings_env

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "bare.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.bench.worker"],
                env=settings_env(settings),  # the same FEDVEC_* settings as the worker's
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                text=True,
            )
        self._send({"data": str(data), "steps": steps, "seed": seed})
        self._receive()  # the model is loaded

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the bare-loop process exited ({self.proc.wait()}):\n{_log_tail(self.log_path)}"
            )
        return json.loads(line)

    def run(self) -> tuple[float, float, int]:
        self._send({"run": True})
        out = self._receive()
        return out["seconds"], out["loss"], out["samples"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _bare_child() -> None:
    """`python -m services.bench.worker`: load the model once, then one bare training run
    per line read; JSON lines in and out (stdout carries nothing else)."""
    from peft import get_peft_model_state_dict

    from services.client_data import load_examples
    from services.settings import load_settings
    from workers.model import initial_adapter

    settings = load_settings()
    config = json.loads(sys.stdin.readline())
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    bare = load_bare_model(settings, settings.device)
    start = initial_adapter(get_peft_model_state_dict(bare.model), settings.lora_init_seed)
    examples = load_examples(config["data"])
    print(json.dumps({"ready": True}), flush=True)
    for _line in sys.stdin:
        seconds, loss, samples = bare_train(
            bare,
            start,
            examples,
            steps=config["steps"],
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            learning_rate=settings.learning_rate,
            seed=config["seed"],
        )
        print(json.dumps({"seconds": seconds, "loss": loss, "samples": samples}), flush=True)


def finetune_overhead(
    settings: Settings, plan: WorkerBenchPlan, work: Path, progress: Progress
) -> dict[str, Any]:

    from services import operations as ops
    from services import processes
    from services.celery_app import make_app
    from services.client_data import load_examples
    from services.db import upgrade
    from services.demo_data import build_demo_clients
    from workers.model import training_seed

    echo = progress.echo
    demo = build_demo_clients(
        work / "data", train_per_client=plan.train_examples, test_per_client=8
    )
    client = demo[0]  # news-a: 5 options per example
    examples = load_examples(client.train_path)
    per_epoch = math.ceil(len(examples) / settings.batch_size)
    metrics_port = free_port()
    # The embedded deployment, whatever FEDVEC_* says; fp32 on either device, so that
    # the bare loop and the worker do the same arithmetic.
    s = settings.replace(
        model_kind="encoder",
        home=str(work / "fedvec"),
        database_url="",
        object_store_url="",
        broker_url="",
        site="",
        device=plan.device,
        precision="fp32",
        epochs=math.ceil(plan.steps / per_epoch),
        max_steps=plan.steps,
        metrics_port=metrics_port,
        log_level="INFO",  # the breakdown is read from the worker's log lines
    )
    upgrade(s.resolved_database_url)
    client_id = int(ops.enroll(s, "bench", client.train_path, task=client.task)["id"])
    # the seed the worker derives for this client's updates from version 0 (no aggregator
    # runs, so every update starts there): both loops then draw the same batches
    seed = training_seed(s, client_id, 0)
    send = make_app(s).send_task
    log_path = work / "logs" / "worker.log"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    worker = processes.start("worker", s, log_path)
    bare: BareProcess | None = None
    try:
        bare = BareProcess(s, client.train_path, steps=plan.steps, seed=seed, log_dir=work / "logs")
        run_bare = bare.run

        def run_fedvec(timeout: float, *, warm: bool = True) -> dict[str, Any]:
            req = ops.train_request(s, client_id)
            # before its first task the worker may not serve /metrics yet
            before = _scrape(metrics_url) if warm else {}
            sent = time.time()
            ops.send_train(send, req, site="default")
            row = _wait_update(s.home_path, client_id, req.request_id, worker, log_path, timeout)
            after = _scrape(metrics_url)
            logged = _log_times(log_path, req.request_id)
            for _ in range(40):  # the log line follows the commit by a moment
                if "stored" in logged:
                    break
                time.sleep(0.05)
                logged = _log_times(log_path, req.request_id)
            # the end: the log line after the commit; else the row's insert time (just before)
            stored = max(row["stored_at"], logged.get("stored", 0.0))
            total = stored - sent
            run: dict[str, Any] = {"total_s": total, "loss": row["loss"], "steps": row["steps"]}
            run["train_loop_s"] = row["duration_s"]
            if "received" in logged and "training" in logged:
                run["queue_s"] = logged["received"] - sent
                run["prepare_s"] = logged["training"] - logged["received"]
                run["finish_s"] = stored - logged["training"] - row["duration_s"]
            for key in ("store_get", "store_put"):
                if key in after:
                    run[key + "_s"] = after[key] - before.get(key, 0.0)
            return run

        progress.step("warm-up: bare loop")
        run_bare()
        progress.step("warm-up: worker start + model load")
        t_warm = time.monotonic()
        run_fedvec(timeout=1800, warm=False)  # the worker's first task loads the model
        echo(f"   worker start, model load and first task: {time.monotonic() - t_warm:.1f} s")
        bare_runs: list[tuple[float, float, int]] = []
        fedvec_runs: list[dict[str, Any]] = []
        for i in range(plan.repeats):  # interleaved, so drift hits both alike
            progress.step(f"bare loop {i + 1}/{plan.repeats}")
            bare_runs.append(run_bare())
            progress.step(f"fedvec task {i + 1}/{plan.repeats}")
            fedvec_runs.append(run_fedvec(timeout=1800))
            echo(
                f"   run {i + 1}/{plan.repeats}: bare {bare_runs[-1][0]:.2f} s, "
                f"fedvec {fedvec_runs[-1]['total_s']:.2f} s"
            )
    finally:
        if bare is not None:
            bare.close()
        processes.stop(worker)
    samples = bare_runs[0][2]
    bare_s = _median([r[0] for r in bare_runs])
    fedvec_s = _median([r["total_s"] for r in fedvec_runs])
    breakdown = {
        key: _r(_median([r[key] for r in fedvec_runs]))
        for key in (
            "queue_s",
            "prepare_s",
            "store_get_s",
            "train_loop_s",
            "finish_s",
            "store_put_s",
        )
        if all(key in r for r in fedvec_runs)
    }
    ratio = fedvec_s / bare_s
    return {
        "client": client.name,
        "examples": len(examples),
        "steps": plan.steps,
        "samples_per_run": samples,
        "bare_s": [_r(r[0]) for r in bare_runs],
        "fedvec_s": [_r(r["total_s"]) for r in fedvec_runs],
        "bare_median_s": _r(bare_s),
        "fedvec_median_s": _r(fedvec_s),
        "ratio": _r(ratio),
        "target": FINETUNE_TARGET,
        "met": ratio <= FINETUNE_TARGET,
        "samples_per_s": {
            "bare": _r(samples / bare_s, 2),
            "fedvec": _r(samples / fedvec_s, 2),
            "fedvec_training_loop": _r(
                samples / _median([r["train_loop_s"] for r in fedvec_runs]), 2
            ),
        },
        "fedvec_breakdown_median_s": breakdown,
        "mean_loss": {"bare": _r(bare_runs[0][1], 5), "fedvec": _r(fedvec_runs[0]["loss"], 5)},
    }


# --- 2. object store ---------------------------------------------------------------------


@contextlib.contextmanager
def s3_server_process() -> Iterator[str]:
    """moto's S3 server (services.s3_server) in a child process; yields host:port."""
    code = (
        "import sys\n"
        "from services.s3_server import start_s3_server\n"
        "endpoint, stop = start_s3_server()\n"
        "print(endpoint, flush=True)\n"
        "sys.stdin.read()\n"  # until the parent closes our stdin
        "stop()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        if not endpoint:
            raise RuntimeError(f"moto's S3 server did not start (exit {proc.wait()})")
        yield endpoint
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _parts(etag: str | None) -> int:
    """Parts of a multipart upload from its S3 ETag ("<md5>-<parts>"); 1 for a single PUT."""
    m = re.search(r"-(\d+)$", (etag or "").strip('"'))
    return int(m.group(1)) if m else 1


def measure_memory(fn: Callable[[], Any]) -> int:
    """Peak Python allocations (tracemalloc) while `fn` runs, what it returns still held.
    Bytes objects and the tensors safetensors builds over them are counted; tensors that
    torch allocates itself are not (the caller's adapter, for instance)."""
    import gc

    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


class _CallCounter:
    """Which upload method of the store fedvec's put_state calls (put: the bytes in
    memory; put_file: streamed from a file)."""

    def __init__(self, store: Any) -> None:
        self.calls: list[str] = []
        for name in ("put", "put_file"):
            original = getattr(store, name)

            def wrapped(*args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
                self.calls.append(_name)
                return _orig(*args, **kw)

            setattr(store, name, wrapped)


def object_store_overhead(
    plan: WorkerBenchPlan, progress: Progress, max_adapter_bytes: int
) -> dict[str, Any]:
    from minio import Minio

    from services import adapter_store as ads
    from services.object_store import S3Store

    echo = progress.echo
    sizes: list[tuple[str, dict[str, torch.Tensor]]] = [(MINILM_LORA, minilm_lora_state())]
    sizes += [(f"{mib:g}-mib", synthetic_state(int(mib * MIB))) for mib in plan.adapter_sizes_mib]
    rows: list[dict[str, Any]] = []
    with s3_server_process() as endpoint:
        bucket = "fedvec-bench"
        store = S3Store(endpoint, bucket, "bench", "bench")
        counter = _CallCounter(store)
        raw = Minio(endpoint, access_key="bench", secret_key="bench", secure=False)
        echo(f"   moto S3 server at {endpoint} (child process), {plan.repeats} repeats")
        for label, state in sizes:
            data = ads.encode(state)
            limit = max(max_adapter_bytes, len(data))
            fed_key, raw_key = f"bench/{label}/fedvec.safetensors", f"bench/{label}/raw.safetensors"
            times: dict[str, list[float]] = {
                "fed_up": [],
                "fed_down": [],
                "raw_up": [],
                "raw_down": [],
            }
            digest = ""
            for i in range(plan.repeats + 1):  # the first round warms connections, untimed
                t0 = time.perf_counter()
                digest = ads.put_state(store, fed_key, state)
                t1 = time.perf_counter()
                got = ads.get_state(store, fed_key, max_bytes=limit, expected_sha256=digest)
                t2 = time.perf_counter()
                raw.put_object(bucket, raw_key, io.BytesIO(data), len(data))
                t3 = time.perf_counter()
                response = raw.get_object(bucket, raw_key)
                try:
                    body = response.read()
                finally:
                    response.close()
                    response.release_conn()
                t4 = time.perf_counter()
                if len(body) != len(data) or set(got) != set(state):
                    raise RuntimeError(f"{label}: what came back differs from what was sent")
                del got, body
                if i > 0:
                    times["fed_up"].append(t1 - t0)
                    times["fed_down"].append(t2 - t1)
                    times["raw_up"].append(t3 - t2)
                    times["raw_down"].append(t4 - t3)
                    progress.step(f"object store {label} {i}/{plan.repeats}")
            # what fedvec does beyond moving bytes, each step timed on its own
            parts_s: dict[str, list[float]] = {"sha256": [], "encode": [], "decode": []}
            for _ in range(plan.repeats):
                for part, fn in (
                    ("sha256", lambda d=data: ads.sha256(d)),
                    ("encode", lambda st=state: ads.encode(st)),
                    ("decode", lambda d=data, m=limit: ads.decode(d, max_bytes=m)),
                ):
                    t0 = time.perf_counter()
                    fn()
                    parts_s[part].append(time.perf_counter() - t0)
            med = {k: _median(v) for k, v in times.items()}
            fed, rawt = med["fed_up"] + med["fed_down"], med["raw_up"] + med["raw_down"]
            row = {
                "adapter": label,
                "bytes": len(data),
                "mib": _r(len(data) / MIB, 2),
                "fedvec_upload_s": _r(med["fed_up"], 4),
                "fedvec_download_s": _r(med["fed_down"], 4),
                "raw_upload_s": _r(med["raw_up"], 4),
                "raw_download_s": _r(med["raw_down"], 4),
                "ratio": _r(fed / rawt),
                "upload_ratio": _r(med["fed_up"] / med["raw_up"]),
                "download_ratio": _r(med["fed_down"] / med["raw_down"]),
                "met": fed / rawt <= STORE_TARGET,
                "parts_fedvec": _parts(raw.stat_object(bucket, fed_key).etag),
                "parts_raw": _parts(raw.stat_object(bucket, raw_key).etag),
                "fedvec_upload_call": sorted(set(counter.calls)),
                "sha256_ok": digest == ads.sha256(data),
                "fedvec_steps_s": {k: _r(_median(v), 4) for k, v in parts_s.items()},
            }
            counter.calls.clear()
            rows.append(row)
            echo(
                f"   {label:>12} {row['mib']:>7.2f} MiB  fedvec up {med['fed_up']:.4f} s "
                f"down {med['fed_down']:.4f} s | raw up {med['raw_up']:.4f} s "
                f"down {med['raw_down']:.4f} s | ratio {row['ratio']:.3f} "
                f"(<= {STORE_TARGET}: {'met' if row['met'] else 'NOT met'}) | "
                f"parts {row['parts_fedvec']}/{row['parts_raw']} | "
                f"fedvec uploads with store.{'/'.join(row['fedvec_upload_call'])}"
            )
            echo(
                "                fedvec's own steps: "
                + ", ".join(f"{k} {v:.4f} s" for k, v in row["fedvec_steps_s"].items())
                + " (each alone; a download hashes while the bytes arrive)"
            )
        # memory of moving the largest adapter, each direction apart
        label, state = sizes[-1]
        data = ads.encode(state)
        limit = max(max_adapter_bytes, len(data))
        fed_key, raw_key = f"bench/{label}/fedvec.safetensors", f"bench/{label}/raw.safetensors"
        digest = ads.sha256(data)

        def raw_download() -> bytes:
            response = raw.get_object(bucket, raw_key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        measured = {
            "fedvec_upload": measure_memory(lambda: ads.put_state(store, fed_key, state)),
            "fedvec_download": measure_memory(
                lambda: ads.get_state(store, fed_key, max_bytes=limit, expected_sha256=digest)
            ),
            "raw_upload": measure_memory(
                lambda: raw.put_object(bucket, raw_key, io.BytesIO(data), len(data))
            ),
            "raw_download": measure_memory(raw_download),
        }
        progress.step("object store memory")
    memory: dict[str, Any] = {"adapter": label, "bytes": len(data)}
    for what, peak in measured.items():
        memory[what] = {"tracemalloc_peak_bytes": peak, "x_adapter": _r(peak / len(data), 2)}
        echo(
            f"   peak memory, {label} ({len(data) / MIB:.1f} MiB): {what.replace('_', ' '):<16}"
            f" {peak / MIB:7.1f} MiB = {peak / len(data):.2f}x the adapter (tracemalloc)"
        )
    big = rows[-1]
    streamed = "put_file" in big["fedvec_upload_call"]
    memory["note"] = (
        "while the caller holds the tensors (upload) or the result (download); raw minio's "
        "bytes exist before its upload starts, fedvec encodes them inside put_state"
    )
    multipart = [r for r in rows if r["bytes"] > MULTIPART_ABOVE]
    return {
        "target": STORE_TARGET,
        "sizes": rows,
        "memory": memory,
        "multipart_above_5mib": all(r["parts_fedvec"] > 1 for r in multipart)
        if multipart
        else None,
        "upload_streamed_from_file": streamed,
    }


# --- 3. GPU ------------------------------------------------------------------------------
def llama_1b_config(vocab_size: int, pad: int | None, bos: int | None, eos: int | None) -> Any:
    """TinyLlama-1.1B's shape (22 layers, width 2048, grouped-query attention): ~1.1B
    parameters with a 30k vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def runtime_throughput(
    settings: Settings,
    examples: Sequence[Example],
    *,
    steps: int,
    causal_config: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Samples/s, tokens/s and peak device memory of fedvec's own runtime training
    `steps` LoRA steps (after a 2-step warm-up). With `causal_config`, a causal LM built
    from the config it returns for the tokenizer (random weights, nothing loaded)."""
    from transformers import AutoModelForCausalLM

    from workers.model import CausalLMRuntime, ModelRuntime

    per_epoch = math.ceil(len(examples) / settings.batch_size)
    s = settings.replace(epochs=math.ceil((steps + 2) / per_epoch), max_steps=2)
    if causal_config is None:
        runtime = ModelRuntime(s.replace(model_kind="encoder"))
    else:

        class FromConfig(CausalLMRuntime):
            def _load_base(self, dropout: float | None) -> Any:
                tok = self.tokenizer
                # a BERT tokenizer stands in: [CLS] begins, [SEP] ends a sequence
                tok.bos_token = tok.bos_token or tok.cls_token
                tok.eos_token = tok.eos_token or tok.sep_token
                config = causal_config(tok)
                config.name_or_path = self.settings.model_path  # what peft records as base
                with torch.device(self.device):  # built in place, not on the CPU first
                    return AutoModelForCausalLM.from_config(config, dtype=self.dtype)

        runtime = FromConfig(s.replace(model_kind="causal-lm", lora_target_modules="q_proj,v_proj"))
    device = runtime.device
    start = runtime.initial_adapter()
    runtime.train(start, examples, seed=0)  # warm-up: kernels, allocator
    runtime.settings = s.replace(max_steps=steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    result = runtime.train(start, examples, seed=0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    params = sum(p.numel() for p in runtime.model.parameters())
    out = {
        "parameters": params,
        "trainable": runtime.num_trainable(),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "steps": result.steps,
        "samples_per_s": _r(result.samples / result.duration_s, 2),
        "tokens_per_s": _r(result.tokens / result.duration_s, 1),
        "peak_memory_gib": None if peak is None else _r(peak / 2**30, 2),
    }
    del runtime, result
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def gpu_throughput(
    settings: Settings, plan: WorkerBenchPlan, work: Path, progress: Progress
) -> dict[str, Any]:
    from services.client_data import load_examples
    from services.demo_data import build_demo_clients

    if not torch.cuda.is_available():
        progress.echo("   skipped: no CUDA device (torch.cuda.is_available() is False)")
        return {"skipped": "no CUDA device"}
    demo = build_demo_clients(work / "gpu-data", train_per_client=64, test_per_client=8)
    examples = load_examples(demo[0].train_path)
    s = settings.replace(device="cuda", precision="auto")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    models: list[tuple[str, Callable[[Any], Any] | None]] = [
        ("minilm", None),
        (
            "llama-1b",
            lambda tok: llama_1b_config(
                len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
            ),
        ),
    ]
    for name, config in models:
        progress.step(f"gpu {name}")
        fig = runtime_throughput(s, examples, steps=plan.gpu_steps, causal_config=config)
        out[name] = fig
        progress.echo(
            f"   {name:<9} {fig['parameters'] / 1e6:8.1f} M params ({fig['dtype']} base, "
            f"{fig['trainable'] / 1e6:.2f} M trainable): {fig['samples_per_s']:.1f} samples/s, "
            f"{fig['tokens_per_s']:.0f} tokens/s, peak {fig['peak_memory_gib']:.2f} GiB "
            f"(batch {s.batch_size}, max {s.max_length} tokens, {fig['steps']} steps)"
        )
    return out


def _breakdown_text(bd: dict[str, float | None]) -> str:
    labels = {
        "queue_s": "send -> worker received {:.3f} s",
        "prepare_s": "prepare {:.3f} s",
        "store_get_s": "(of which store get {:.4f} s)",
        "train_loop_s": "training loop {:.3f} s",
        "finish_s": "finish {:.3f} s",
        "store_put_s": "(of which store puts {:.4f} s)",
    }
    return ", ".join(labels[k].format(v) for k, v in bd.items() if v is not None).replace(
        ", (", " ("
    )


# --- all ---------------------------------------------------------------------------------
def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_worker_bench(
    settings: Settings, plan: WorkerBenchPlan, *, echo: Echo, command: str = ""
) -> dict[str, Any]:
    started = time.monotonic()
    gpu_units = 2 if torch.cuda.is_available() else 0
    total = 2 + 2 * plan.repeats + (1 + len(plan.adapter_sizes_mib)) * plan.repeats + 1
    progress = Progress(total + gpu_units, echo)
    say = progress.echo
    meta = {
        "command": command,
        "quick": plan.quick,
        "device": plan.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": plan.steps,
        "repeats": plan.repeats,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "learning_rate": settings.learning_rate,
        "lora": f"r={settings.lora_r} alpha={settings.lora_alpha} "
        f"on {settings.lora_target_modules}",
    }
    say(
        f"fedvec bench worker: {plan.device}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, "
        f"{plan.steps} steps x batch {settings.batch_size}, max {settings.max_length} tokens, "
        f"LoRA {meta['lora']}, {plan.repeats} repeat(s)"
    )
    # SIGTERM as an exception, so that the finally blocks stop the child processes
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_exit) if in_main else None
    try:
        with tempfile.TemporaryDirectory(prefix="fedvec-bench-worker-") as tmp:
            work = Path(tmp)
            say(
                "1. fine-tune: bare transformers+peft loop vs fedvec's Celery train task end to end"
            )
            ft = finetune_overhead(settings, plan, work, progress)
            bd = ft["fedvec_breakdown_median_s"]
            say(
                f"   bare loop    median {ft['bare_median_s']:.3f} s  "
                f"{ft['samples_per_s']['bare']:.2f} samples/s\n"
                f"   fedvec task  median {ft['fedvec_median_s']:.3f} s  "
                f"{ft['samples_per_s']['fedvec']:.2f} samples/s (send -> update reported)\n"
                f"   ratio fedvec/bare {ft['ratio']:.3f} (target <= {FINETUNE_TARGET}: "
                f"{'met' if ft['met'] else 'NOT met'})\n"
                f"   fedvec breakdown (medians): {_breakdown_text(bd)}"
                f"\n   same work: {ft['steps']} steps, mean loss bare {ft['mean_loss']['bare']}, "
                f"fedvec {ft['mean_loss']['fedvec']}"
            )
            say("2. object store: fedvec adapter_store vs raw minio put/get of the same bytes")
            store = object_store_overhead(plan, progress, settings.max_adapter_bytes)
            say(
                f"   multipart above 5 MiB: {store['multipart_above_5mib']}; upload streamed "
                f"from a file: {store['upload_streamed_from_file']}"
            )
            say("3. GPU: fedvec runtime samples/s and peak memory")
            gpu = gpu_throughput(settings, plan, work, progress)
    finally:
        progress.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    meta["wall_s"] = round(time.monotonic() - started, 1)
    echo(f"total {meta['wall_s']:.0f} s")
    return {"meta": meta, "finetune": ft, "object_store": store, "gpu": gpu}


if __name__ == "__main__":
    _bare_child()
