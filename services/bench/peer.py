"""`fedvec bench peer`: the same FedAvg run in Flower's simulation and in fedvec's
synchronous mode, side by side: seconds per round and final accuracy.

What is the same on both sides, so that only the framework differs:
- the clients (flan8's multiple-choice clients, or the demo data when flan8 is absent),
  their training data and test splits;
- the model and the local step: Flower's ClientApp calls fedvec's own `ModelRuntime`
  (MiniLM + the same LoRA config and scoring head) `train` and `evaluate`, with the same
  settings (steps, learning rate, batch, max. length, one torch thread per executor) and
  the same per-(client, round) training seed as fedvec's worker;
- the starting adapter (`ModelRuntime.initial_adapter`, seeded) and the aggregation:
  FedAvg weighted by examples over the LoRA + head parameters (Flower's `FedAvg` averages
  θ_k; fedvec's `fedavg` strategy adds the weighted mean of τ_k = θ_k − θ̄ to θ̄, the same
  thing), for R rounds;
- the parallelism: fedvec runs `workers` worker processes, Flower's Ray backend as many
  ClientApp actors (one CPU each).

How each side runs:
- fedvec: the real service as `fedvec demo` and `fedvec bench quality` run it (embedded:
  SQLite, the local object store, the folder broker, real worker and aggregator
  processes; strategy `fedavg`); a round is `start_round` to "aggregated", as
  `fedvec train --rounds` waits for it.
- Flower (`flwr[simulation]`): a `ServerApp` running Flower's message-API `FedAvg` and a
  `ClientApp`, in Flower's Simulation Runtime on its Ray backend, through
  `flwr.simulation.run_simulation`: the runtime that `flwr run` starts for a local
  simulation federation, without packaging the app and starting a SuperLink. A round is
  `configure_train` to the end of `aggregate_train`; the final federated evaluation is a
  step of its own, as fedvec's `evaluate` is.

Round 1 on both sides also pays for starting the executors (Celery workers; Ray and its
actors) and loading the model, so the per-round figure compared is the median of the
rounds after the first (every round is printed too).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from aggregator.task_vectors import StateDict, flatten, task_vector
from schema.models import RoundStatus, Update, UpdateStatus
from services import adapter_store as ads
from services import operations as ops
from services.bench.common import git_commit, latest_states
from services.client_data import ClientSpec, load_examples
from services.console import Echo, table
from services.context import object_store
from services.db import session_scope
from services.demo import demo_clients
from services.federation import fresh_federation, running
from services.settings import Settings

FLOWER_MISSING = (
    "Flower is not installed: `fedvec bench peer` needs the bench extra, "
    "`pip install -e '.[bench]'` (it installs flwr[simulation] with Ray)."
)


@dataclass(frozen=True)
class PeerPlan:
    dataset: str = "auto"  # "flan8" when its folder is there, else "demo"
    clients: int = 6
    rounds: int = 5
    train_per_client: int = 64  # 8 LoRA steps per round at batch 8
    test_per_client: int = 128
    seed: int = 0
    workers: int = 2  # fedvec worker processes = Flower actors (one core each)
    learning_rate: float = 5e-3
    max_length: int = 64
    batch_size: int = 8
    profile: bool = False  # py-spy on fedvec's processes during rounds 2..R


QUICK = PeerPlan(clients=2, rounds=2, train_per_client=8, test_per_client=16)  # 1 step a round


@dataclass
class SideResult:
    """One framework's run."""

    framework: str
    round_s: list[float]
    train_s: list[float]  # per round: fine-tuning seconds summed over the clients
    eval_s: float
    total_s: float
    accuracy: dict[str, float]
    test_examples: dict[str, int]
    steps: int  # LoRA steps per client per round
    initial_adapter: StateDict = field(repr=False)
    final_adapter: StateDict = field(repr=False)
    other_load_cores: float | None = None  # mean CPU use of other programs meanwhile

    @property
    def steady_round_s(self) -> float:
        """Median round, without round 1 (it also starts the executors and loads the
        model) when there is more than one."""
        rounds = self.round_s[1:] or self.round_s
        return statistics.median(rounds)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / max(len(self.accuracy), 1)

    def to_dict(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.endswith("_adapter")
        }
        out["median_round_s"] = self.steady_round_s
        out["mean_accuracy"] = self.mean_accuracy
        return out


def _proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used) of every process, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        out[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    return out


class OtherLoad:
    """CPU used by programs other than this process and its descendants (the fedvec
    processes, Ray's), sampled every second: on 2 cores they slow a side down."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        before = _proc_cpu()
        while not self._stop.wait(1.0):
            now = _proc_cpu()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in now.items():
                children.setdefault(ppid, []).append(pid)
            mine, todo = set(), [os.getpid()]
            while todo:
                pid = todo.pop()
                mine.add(pid)
                todo += children.get(pid, [])
            for pid, (_, cpu) in now.items():
                if pid not in mine:
                    self.cpu_s += cpu - before[pid][1] if pid in before else cpu
            before = now

    def __enter__(self) -> OtherLoad:
        self._t0 = time.perf_counter()
        if Path("/proc/self/stat").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.cores = self.cpu_s / max(time.perf_counter() - self._t0, 1e-9)


def measured(run: Callable[[], SideResult]) -> SideResult:
    """Run one side and note how busy the machine was with other work meanwhile."""
    with OtherLoad() as other:
        result = run()
    result.other_load_cores = other.cores
    return result


def flower_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("flwr", "ray"))


def run_settings(settings: Settings, plan: PeerPlan, home: Path) -> Settings:
    return settings.replace(
        home=str(home),
        strategy="fedavg",
        seed=plan.seed,
        lora_init_seed=plan.seed,
        learning_rate=plan.learning_rate,
        max_length=plan.max_length,
        batch_size=plan.batch_size,
        database_url="",
        object_store_url="",
        broker_url="",
        torch_threads=1,  # one core per executor, the same on both sides
    )


# --- fedvec ---------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
OWN_PACKAGES = ("services", "workers", "aggregator", "schema")


def py_spy_path() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


@contextmanager
def py_spy(pids: dict[str, int], out_dir: Path) -> Iterator[dict[str, Path]]:
    """Sample the processes' busy stacks (no idle threads) at 100 Hz while the block runs:
    where their CPU time goes. Raw (collapsed-stack) files, one per process."""
    exe = py_spy_path()
    if exe is None:
        raise ops.OperationError("--profile needs py-spy: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / f"{name}.txt" for name in pids}
    procs = [
        subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking"]
            + ["--format", "raw", "--output", str(files[name])],
            stdout=subprocess.DEVNULL,
            stderr=open(out_dir / f"{name}.log", "wb"),  # noqa: SIM115 - the child's copy
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # attached before the measured work starts
    try:
        yield files
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _frame_owner(frame: str) -> str | None:
    """'function (path:line)' -> 'package/module.py:function' when it is fedvec's code."""
    if not frame.endswith(")") or " (" not in frame:
        return None
    func, where = frame[:-1].rsplit(" (", 1)
    path = where.rsplit(":", 1)[0]
    if "site-packages" in path:
        return None
    rel = path.removeprefix(str(REPO) + "/")
    if rel.split("/", 1)[0] not in OWN_PACKAGES:
        return None
    return f"{rel}:{func}"


def summarize_profile(path: Path, rate: int = 100, top: int = 6) -> dict[str, Any]:
    """Busy seconds of one process and the fedvec functions they were spent under
    (inclusive); the rest ran outside fedvec's code (Celery/kombu, imports, ...)."""
    total = 0
    inclusive: Counter[str] = Counter()
    outside = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            owners = {o for f in stack.split(";") if (o := _frame_owner(f))}
            inclusive.update(dict.fromkeys(owners, n))
            outside += 0 if owners else n
    # drop the entry points every sample passes through: they say nothing
    functions = [(k, v / rate) for k, v in inclusive.most_common() if v < 0.95 * total]
    return {
        "busy_s": total / rate,
        "outside_fedvec_code_s": outside / rate,
        "top": functions[:top],
    }


def run_fedvec(
    settings: Settings,
    plan: PeerPlan,
    clients: list[ClientSpec],
    home: Path,
    echo: Echo,
    profile: dict[str, Any] | None = None,
) -> tuple[SideResult, dict[str, int]]:
    """The real service, synchronous rounds with strategy fedavg; returns the result and
    the clients' database ids (which seed their training)."""
    t0 = time.perf_counter()
    s = fresh_federation(run_settings(settings, plan, home), home, clients)
    enrolled = ops.resolve_clients(s, [], all_=True)
    ids = {c.name: c.id for c in enrolled}
    round_s: list[float] = []
    round_ids: list[int] = []
    profiling = ExitStack()
    files: dict[str, Path] = {}
    with running(s, home / "logs", workers=plan.workers) as service, profiling:
        send, alive, procs = service.send, service.alive, service.procs

        for r in range(1, plan.rounds + 1):
            if profile is not None and r == 2:  # steady state: after start-up and loading
                names = ["aggregator"] + [f"worker-{i}" for i in range(plan.workers)]
                pids = {"driver": os.getpid()}
                pids.update((n, p.pid) for n, p in zip(names, procs, strict=True))
                files = profiling.enter_context(py_spy(pids, home / "profile"))
            t = time.perf_counter()
            rid = ops.start_round(s, enrolled, send)

            def done(rid: int = rid) -> tuple[bool, int]:
                alive()
                p = ops.round_progress(s, rid)
                return p.status == RoundStatus.AGGREGATED, p.reported

            # what `fedvec train --rounds` does (ops.wait_round), with the liveness check
            ops.wait_for(done, total=len(enrolled), timeout=1800, desc="round", show=False)
            round_s.append(time.perf_counter() - t)
            round_ids.append(rid)
            echo(f"  fedvec round {r}/{plan.rounds}: {round_s[-1]:.1f}s")
        profiling.close()  # the profile covers rounds 2..R, not the evaluation
        if profile is not None and files:
            profile["seconds"] = sum(round_s[1:])
            profile["processes"] = {n: summarize_profile(f) for n, f in files.items()}
        t = time.perf_counter()
        alive()
        evals = ops.evaluate(s, enrolled, send, timeout=1800, show=False)
        eval_s = time.perf_counter() - t
    total_s = time.perf_counter() - t0
    with session_scope(s.resolved_database_url) as db:
        updates = db.scalars(select(Update).where(Update.round_id.in_(round_ids))).all()
        failed = [u.reason for u in updates if u.status != UpdateStatus.AGGREGATED]
        if failed:
            raise ops.OperationError(f"fedvec: {len(failed)} updates not aggregated: {failed[0]}")
        train_s = [
            sum(u.duration_s or 0.0 for u in updates if u.round_id == rid) for rid in round_ids
        ]
        steps = max(u.steps or 0 for u in updates)
    personalized, _, _ = latest_states(s)
    initial = ads.get_state(object_store(s), ads.INITIAL_ADAPTER_KEY, max_bytes=s.max_adapter_bytes)
    result = SideResult(
        framework="fedvec",
        round_s=round_s,
        train_s=train_s,
        eval_s=eval_s,
        total_s=total_s,
        accuracy={e["client"]: e["accuracy"] for e in evals},
        test_examples={e["client"]: e["num_examples"] for e in evals},
        steps=steps,
        initial_adapter=initial,
        final_adapter=personalized[clients[0].name],  # FedAvg: every client's is the same
    )
    return result, ids


# --- Flower ---------------------------------------------------------------------------
# The ClientApp's functions live at module level: Ray pickles them by reference, and each
# actor keeps its model loaded between messages (get_runtime), as a fedvec worker does.
# Like the worker, they read the client's data file for every message.


def _spec(message: Any, context: Any) -> tuple[Settings, dict[str, Any]]:
    """This run's settings and this node's client, from the config the server sends."""
    spec = json.loads(str(message.content["config"]["spec"]))
    client = spec["clients"][int(context.node_config["partition-id"])]
    return Settings(**spec["settings"]), client


def _arrays_to_state(record: Any) -> StateDict:
    # a copy: the arrays' buffers are read-only, and torch warns about those
    return {k: torch.tensor(v.numpy()) for k, v in record.items()}


def flower_train(message: Any, context: Any) -> Any:
    """The ClientApp's train: fedvec's ModelRuntime.train from the global adapter."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from workers.model import get_runtime, training_seed

    settings, client = _spec(message, context)
    server_round = int(message.content["config"]["server-round"])
    runtime = get_runtime(settings)
    examples = load_examples(client["train"])
    start = _arrays_to_state(message.content["arrays"])
    # what fedvec's worker uses for round r, which trains from version r − 1
    seed = training_seed(settings, client["id"], server_round - 1)
    result = runtime.train(start, examples, seed=seed)
    metrics = MetricRecord(
        {
            "num-examples": len(examples),
            "train-loss": result.loss,
            "train-s": result.duration_s,
            "steps": result.steps,
        }
    )
    content = RecordDict(
        {"arrays": ArrayRecord.from_torch_state_dict(result.adapter), "metrics": metrics}
    )
    return Message(content=content, reply_to=message)


def flower_evaluate(message: Any, context: Any) -> Any:
    """The ClientApp's evaluate: fedvec's ModelRuntime.evaluate on the client's test split."""
    from flwr.app import Message, MetricRecord, RecordDict

    from workers.model import get_runtime

    settings, client = _spec(message, context)
    runtime = get_runtime(settings)
    examples = load_examples(client["test"])
    runtime.load_adapter(_arrays_to_state(message.content["arrays"]))
    accuracy, loss, _ = runtime.evaluate(examples)
    metrics = MetricRecord(
        {
            "num-examples": len(examples),
            "accuracy": accuracy,
            "loss": loss,
            "partition-id": int(context.node_config["partition-id"]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


def _timed_fedavg(rounds: int, nodes: int) -> Any:
    """Flower's FedAvg, timing each round and failing on a client error (FedAvg would go
    on with fewer clients, which is not the run being compared); federated evaluation
    after the last round only."""
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def __init__(self) -> None:
            super().__init__(
                min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes
            )
            self.started: dict[int, float] = {}
            self.round_s: dict[int, float] = {}
            self.train_s: dict[int, float] = {}
            self.steps = 0
            self.eval_s = 0.0
            self.evaluations: list[dict[str, float]] = []

        def _check(self, replies: list[Any], what: str) -> None:
            errors = [m.error.reason for m in replies if m.has_error()]
            if errors or len(replies) != nodes:
                raise RuntimeError(
                    f"Flower {what}: {len(replies)} replies of {nodes}, errors: {errors[:1]}"
                )

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            self.started[server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            self._check(replies, f"round {server_round}")
            out = super().aggregate_train(server_round, replies)
            metrics = [m.content["metrics"] for m in replies]
            self.train_s[server_round] = sum(float(x["train-s"]) for x in metrics)
            self.steps = max(int(x["steps"]) for x in metrics)
            self.round_s[server_round] = time.perf_counter() - self.started[server_round]
            return out

        def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            if server_round < rounds:
                return []
            self.started[-1] = time.perf_counter()
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            if server_round < rounds:
                return None
            self._check(replies, "evaluation")
            self.evaluations = [dict(m.content["metrics"]) for m in replies]
            self.eval_s = time.perf_counter() - self.started[-1]
            return super().aggregate_evaluate(server_round, replies)

    return TimedFedAvg()


def run_flower(
    settings: Settings,
    plan: PeerPlan,
    clients: list[ClientSpec],
    ids: dict[str, int],
    home: Path,
    echo: Echo,
) -> SideResult:
    """Flower's Simulation Runtime (Ray backend) with the ServerApp/ClientApp below."""
    # no telemetry, update checks or Ray usage reports: nothing leaves the machine
    for name in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(name, "0")
    # Ray's FutureWarning about GPU variables on a CPU run: keep its current behaviour
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from workers.model import ModelRuntime

    t0 = time.perf_counter()
    s = run_settings(settings, plan, home)
    spec = {
        "settings": dataclasses.asdict(s),
        "clients": [
            {
                "name": c.name,
                "id": ids[c.name],
                "train": str(c.train_path),
                "test": str(c.test_path),
            }
            for c in clients
        ],
    }
    # the initial adapter fedvec's workers start from (same seeded bytes), built here
    # as a Flower server builds its initial model
    model_log = logging.getLogger("workers.model")
    model_level = model_log.level
    model_log.setLevel(logging.WARNING)  # its "loaded" line is for worker logs
    try:
        initial = ModelRuntime(s.replace(torch_threads=0)).initial_adapter()
    finally:
        model_log.setLevel(model_level)
    strategy = _timed_fedavg(plan.rounds, len(clients))
    final: dict[str, Any] = {}

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        config = ConfigRecord({"spec": json.dumps(spec)})
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord.from_torch_state_dict(initial),
            num_rounds=plan.rounds,
            timeout=1800,
            train_config=config,
            evaluate_config=config,
        )
        final["arrays"] = result.arrays

    client_app = ClientApp()
    client_app.train()(flower_train)
    client_app.evaluate()(flower_evaluate)

    backend_config = {
        "init_args": {
            "num_cpus": plan.workers,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "ERROR",
            "object_store_memory": 256 * 2**20,  # messages are small: a LoRA adapter
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    flwr_log = logging.getLogger("flwr")
    level, pythonpath = flwr_log.level, os.environ.get("PYTHONPATH")
    # a line per message otherwise, and a notice that run_simulation is deprecated in
    # favour of `flwr run` (which starts this same runtime behind a local SuperLink)
    flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(clients),
            backend_config=backend_config,
        )
    finally:
        flwr_log.setLevel(level)
        # Flower's Ray backend extends PYTHONPATH for its actors; keep ours as it was
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    total_s = time.perf_counter() - t0
    if "arrays" not in final or len(strategy.round_s) != plan.rounds:
        raise ops.OperationError("Flower: the simulation ended before its last round")
    for r in range(1, plan.rounds + 1):
        echo(f"  Flower round {r}/{plan.rounds}: {strategy.round_s[r]:.1f}s")
    by_partition = {int(e["partition-id"]): e for e in strategy.evaluations}
    return SideResult(
        framework="flower",
        round_s=[strategy.round_s[r] for r in range(1, plan.rounds + 1)],
        train_s=[strategy.train_s[r] for r in range(1, plan.rounds + 1)],
        eval_s=strategy.eval_s,
        total_s=total_s,
        accuracy={c.name: float(by_partition[i]["accuracy"]) for i, c in enumerate(clients)},
        test_examples={c.name: int(by_partition[i]["num-examples"]) for i, c in enumerate(clients)},
        steps=strategy.steps,
        initial_adapter=initial,
        final_adapter=_arrays_to_state(final["arrays"]),
    )


# --- both -----------------------------------------------------------------------------
def max_difference(a: StateDict, b: StateDict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def relative_difference(fv: SideResult, fl: SideResult) -> float:
    """|θ_fedvec − θ_Flower| / |θ_fedvec − θ_0| (L2 over all trainable parameters): how far
    apart the two runs ended, relative to how far training moved the adapter. Rounding in
    the aggregation (float64 vs float32) grows a little through later rounds' Adam steps."""
    between = flatten(task_vector(fv.final_adapter, fl.final_adapter)).norm()
    moved = flatten(task_vector(fv.final_adapter, fv.initial_adapter)).norm()
    return float(between / moved) if moved > 0 else float(between)


def render(plan: PeerPlan, clients: list[ClientSpec], fl: SideResult, fv: SideResult) -> str:
    rows: list[list[str]] = []

    def row(label: str, a: float, b: float, digits: int = 1, ratio: bool = True) -> None:
        compare = f"{b / a:.2f}" if ratio and a > 0 else ""
        rows.append([label, f"{a:.{digits}f}", f"{b:.{digits}f}", compare])

    for r in range(plan.rounds):
        row(f"round {r + 1} (s)", fl.round_s[r], fv.round_s[r])
    row(f"median round (s, {which_rounds(plan)})", fl.steady_round_s, fv.steady_round_s)
    # the compute inside a round, the same work on both sides (split over the executors)
    row(
        "  fine-tuning, all clients (s)",
        statistics.median(fl.train_s[1:] or fl.train_s),
        statistics.median(fv.train_s[1:] or fv.train_s),
    )
    row("final evaluation (s)", fl.eval_s, fv.eval_s)
    row("total (s)", fl.total_s, fv.total_s)
    for c in clients:
        row(f"accuracy {c.name}", fl.accuracy[c.name], fv.accuracy[c.name], 3, ratio=False)
    row("mean accuracy", fl.mean_accuracy, fv.mean_accuracy, 3, ratio=False)
    return table(rows, ["", f"Flower {_version('flwr')}", "fedvec", "fedvec/Flower"])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def run_peer_bench(settings: Settings, plan: PeerPlan, out_dir: Path, echo: Echo) -> dict[str, Any]:
    if not flower_available():
        raise ops.OperationError(FLOWER_MISSING)
    if plan.clients < 2 or plan.rounds < 1 or plan.workers < 1:
        raise ops.OperationError("need at least 2 clients, 1 round and 1 worker")
    dataset = plan.dataset
    if dataset == "auto":
        dataset = "flan8" if Path(settings.flan8_dir).expanduser().is_dir() else "demo"
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = demo_clients(settings, dataset, out_dir, plan.train_per_client, plan.test_per_client)[
        : plan.clients
    ]
    if len(clients) < plan.clients:
        raise ops.OperationError(f"{dataset} has only {len(clients)} clients")
    echo(
        f"fedvec bench peer: FedAvg in Flower {_version('flwr')} (simulation, Ray "
        f"{_version('ray')}) and in fedvec (synchronous, fedavg): {len(clients)} clients "
        f"({dataset}), {plan.rounds} rounds, {plan.train_per_client} examples per client, "
        f"seed {plan.seed}, {plan.workers} executors"
    )
    profile: dict[str, Any] | None = {} if plan.profile else None
    ids: dict[str, int] = {}

    def fedvec_side() -> SideResult:
        result, fedvec_ids = run_fedvec(settings, plan, clients, out_dir / "fedvec", echo, profile)
        ids.update(fedvec_ids)
        return result

    fedvec = measured(fedvec_side)
    flower = measured(lambda: run_flower(settings, plan, clients, ids, out_dir / "flower", echo))
    start_diff = max_difference(fedvec.initial_adapter, flower.initial_adapter)
    diff = relative_difference(fedvec, flower)
    echo("")
    echo(render(plan, clients, flower, fedvec))
    echo("")
    echo(
        f"both: MiniLM-L6 + LoRA r={settings.lora_r} on {settings.lora_target_modules} + "
        f"scoring head, {fedvec.steps} LoRA steps per client per round (batch "
        f"{plan.batch_size}, lr {plan.learning_rate}), FedAvg weighted by examples; Flower's "
        "ClientApp runs fedvec's own ModelRuntime train/evaluate, so only the framework "
        "differs"
    )
    echo(
        f"adapters: initial max |fedvec - Flower| = {start_diff:.1e}; final "
        f"|fedvec - Flower| / |fedvec - initial| = {diff:.1e} (the same run, up to float "
        "rounding); accuracy on each client's test split "
        f"({'/'.join(map(str, sorted(set(fedvec.test_examples.values()))))} examples)"
    )
    fv_load, fl_load = fedvec.other_load_cores, flower.other_load_cores
    if fv_load is not None and fl_load is not None:
        echo(
            f"other programs' CPU use meanwhile: fedvec's run {fv_load:.2f} cores, "
            f"Flower's {fl_load:.2f} cores (of {os.cpu_count()})"
            + (
                "; WARNING: the machine was not quiet, the timings are disturbed"
                if max(fv_load, fl_load) > 0.2
                else ""
            )
        )
    slower = fedvec.steady_round_s > flower.steady_round_s
    echo(
        f"per round fedvec is {'slower' if slower else 'no slower'}: "
        f"{fedvec.steady_round_s:.1f}s vs {flower.steady_round_s:.1f}s "
        f"(median of {which_rounds(plan)})"
    )
    if profile:
        echo(render_profile(profile, plan))
    return {
        "profile": profile,
        "dataset": dataset,
        "plan": dataclasses.asdict(plan),
        "versions": {"flwr": _version("flwr"), "ray": _version("ray"), "torch": torch.__version__},
        "commit": git_commit(),
        "flower": flower.to_dict(),
        "fedvec": fedvec.to_dict(),
        "ratio_median_round": fedvec.steady_round_s / flower.steady_round_s,
        "initial_adapter_max_difference": start_diff,
        "final_adapter_relative_difference": diff,
        "fedvec_slower": slower,
        "wall_s": time.perf_counter() - t0,
    }


def render_profile(profile: dict[str, Any], plan: PeerPlan) -> str:
    lines = [
        f"py-spy profile of fedvec's processes over {which_rounds(plan)} "
        f"({profile['seconds']:.1f}s of rounds): CPU seconds each was busy, and under "
        "which of fedvec's functions (inclusive)"
    ]
    for name, p in profile["processes"].items():
        top = ", ".join(f"{f} {sec:.1f}s" for f, sec in p["top"])
        lines.append(
            f"  {name}: {p['busy_s']:.1f}s busy; {top or '-'}; "
            f"outside fedvec's code {p['outside_fedvec_code_s']:.1f}s"
        )
    return "\n".join(lines)


def which_rounds(plan: PeerPlan) -> str:
    return f"rounds 2-{plan.rounds}" if plan.rounds > 1 else "round 1"
