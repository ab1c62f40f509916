"""Monitoring end to end: the three process types of the Procfile (`fedvec worker`,
`fedvec aggregator`, `fedvec metrics`) serve /metrics while a small real run goes through
Redis, PostgreSQL and an S3 server: 2 clients, 2 synchronous rounds of 2 LoRA steps, one
update the aggregator rejects (a NaN task vector), and a `fedvec evaluate` one of whose
tasks is retried after its database connection is killed. Then:

- each process's /metrics has the key series, with data;
- a real Prometheus (the Debian package's binary) scrapes the three processes every
  second with infra/prometheus/alerts.yml loaded, and every PromQL expression of every
  panel of infra/grafana/dashboards/fedvec.json returns data, every alert rule evaluates;
- promtool accepts every Prometheus config, the rules and their unit tests.

Without the prometheus / promtool binaries (`make monitoring-tools`) the Prometheus tests
skip; under CI=true they fail.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text

from schema.events import UpdateStored
from schema.models import PersonalizedAdapter, Update
from services import adapter_store as ads
from services import operations as ops
from services import processes
from services.celery_app import AGGREGATE_TASK, make_app
from services.context import object_store
from services.db import session_scope, upgrade
from services.demo_data import build_demo_clients
from services.processes import free_port
from services.s3_server import start_s3_server
from services.settings import Settings
from tests.conftest import (
    create_postgres_database,
    redis_broker_url,
    service_settings,
    unavailable,
)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "infra/prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = ROOT / "infra/grafana/dashboards/fedvec.json"
K8S_PROMETHEUS = ROOT / "infra/k8s/prometheus.yaml"
ROLES = ("worker", "aggregator", "metrics")  # Prometheus jobs fedvec-<role>

Samples = dict[str, list[tuple[dict[str, str], float]]]


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(name, FileNotFoundError(f"{name} not on PATH (make monitoring-tools)"))
    return str(path)


def fail_with_logs(message: str, logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        print(f"----- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
    pytest.fail(message)


def wait_until(what: str, check: Callable[[], Any], timeout: float, logs: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            fail_with_logs(f"timed out after {timeout:.0f}s waiting for {what}", logs)
        time.sleep(0.25)


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def scrape(port: int) -> Samples:
    """The samples of one /metrics page by sample name (counters keep their _total)."""
    out: Samples = defaultdict(list)
    page = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (nan if none)."""
    values = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    return sum(values) if values else math.nan


# --- the run ---------------------------------------------------------------------------
@dataclass
class Run:
    home: Path
    settings: Settings
    ports: dict[str, int]
    clients: list[str]
    prometheus: str | None  # base URL, None when the binary is missing
    prometheus_started: float
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """The jobs of infra/prometheus/prometheus.yml on the test's ports, scraped every
    second, with the real alert rules."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": f"fedvec-{role}",
                "static_configs": [{"targets": [f"127.0.0.1:{ports[role]}"]}],
            }
            for role in ROLES
        ],
    }


def start_prometheus(home: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    config = home / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(ports)))  # JSON is YAML
    port = free_port()
    # Debian's default --web.console.* folders need not exist: only /consoles reads them
    with open(home / "logs" / "prometheus.log", "ab") as log:  # the child keeps its copy
        proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("prometheus exited: " + (home / "logs/prometheus.log").read_text()[-2000:])
        try:
            return http_get(url + "/-/ready", timeout=2) is not None
        except OSError:
            return False

    wait_until("prometheus ready", ready, 30, home / "logs")
    return proc, url


def reject_one_update(settings: Settings, logs: Path) -> None:
    """Store an update the way a worker does, from a real one but with a NaN in its task
    vector, and announce it: the aggregator must reject it."""
    db = settings.resolved_database_url
    store = object_store(settings)
    with session_scope(db) as s:
        good = s.scalars(
            select(Update).where(Update.status == "aggregated").order_by(Update.id.desc())
        ).first()
        assert good is not None
        client_id, num_examples = good.client_id, good.num_examples
        tau = ads.get_state(store, good.task_vector_key, max_bytes=2**30)
        trained = ads.get_state(store, good.adapter_key, max_bytes=2**30)
        version = s.scalar(
            select(func.max(PersonalizedAdapter.version)).where(
                PersonalizedAdapter.client_id == client_id
            )
        )
    first = next(iter(tau))
    tau[first] = torch.full_like(tau[first], math.nan)
    uid = str(uuid.uuid4())
    akey, tkey = ads.update_keys(client_id, uid)
    a_sha = ads.put_state(store, akey, trained)
    t_sha = ads.put_state(store, tkey, tau)
    with session_scope(db) as s:
        s.add(
            Update(
                uid=uid,
                client_id=client_id,
                round_id=None,
                base_version=version,
                status="stored",
                adapter_key=akey,
                adapter_sha256=a_sha,
                task_vector_key=tkey,
                task_vector_sha256=t_sha,
                num_examples=num_examples,
            )
        )
    event = UpdateStored(update_uid=uid, client_id=client_id, round_id=None)
    make_app(settings).send_task(AGGREGATE_TASK, args=[event.to_dict()])

    def rejected() -> bool:
        with session_scope(db) as s:
            return s.scalar(select(Update.status).where(Update.uid == uid)) == "rejected"

    wait_until("the NaN update rejected", rejected, 60, logs)


AGGREGATOR_APP_NAME = "fedvec-test-aggregator"  # its PostgreSQL application_name


def evaluate_with_a_retry(run: Run) -> None:
    """`fedvec evaluate --all` while the evaluations table is locked; the aggregator's
    connection (it records the workers' evaluation reports), blocked on that table, is then
    terminated: a transient database error, so the task is retried
    (fedvec_task_retries_total) and the evaluation still completes."""
    engine = create_engine(run.settings.resolved_database_url)
    blocked = text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = :app AND wait_event_type = 'Lock'"
    )
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            conn.execute(text("LOCK TABLE evaluations IN ACCESS EXCLUSIVE MODE"))
            cli = processes.start(
                "evaluate", run.settings, run.home / "logs" / "evaluate.log", "--all"
            )
            run.procs.append(cli)
            # autocommit: pg_stat_activity is a snapshot per transaction
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
                pid = wait_until(
                    "the aggregator waiting on the lock",
                    lambda: probe.execute(blocked, {"app": AGGREGATOR_APP_NAME}).scalar(),
                    60,
                    run.home / "logs",
                )
                probe.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            tx.rollback()
        assert cli.wait(timeout=120) == 0, (run.home / "logs/evaluate.log").read_text()[-3000:]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("monitoring")
    (home / "logs").mkdir()
    url, drop = create_postgres_database()
    try:
        endpoint, stop_s3 = start_s3_server()
    except RuntimeError as exc:
        drop()
        unavailable("S3 test server", exc)
    settings = service_settings(
        home,
        url,
        endpoint,
        broker_url=redis_broker_url(),
        max_steps=2,
        batch_size=4,
        max_length=48,
        torch_threads=1,
        retry_backoff_max=1,  # the retried evaluation runs again within a second
        strategy="fedbip",
    )
    upgrade(url)
    ports = {role: free_port() for role in ROLES}
    run = Run(home, settings, ports, [], None, time.time())
    prometheus_proc = None
    try:
        # Prometheus first, so that it scrapes the whole run
        if shutil.which("prometheus"):
            prometheus_proc, run.prometheus = start_prometheus(home, ports)
            run.prometheus_started = time.time()
        logs = home / "logs"
        worker = settings.replace(metrics_port=ports["worker"])
        run.procs.append(processes.start("worker", worker, logs / "worker.log"))
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGAPPNAME", AGGREGATOR_APP_NAME)  # libpq names its connections
            aggregator = settings.replace(metrics_port=ports["aggregator"])
            run.procs.append(processes.start("aggregator", aggregator, logs / "aggregator.log"))
        run.procs.append(
            processes.start(
                "metrics", settings, logs / "metrics.log", "--port", str(ports["metrics"])
            )
        )
        demo = build_demo_clients(home / "data", train_per_client=8, test_per_client=4)
        for c in (demo[0], demo[3]):  # one news client, one tweets client
            ops.enroll(settings, c.name, c.train_path, test=c.test_path, task=c.task)
            run.clients.append(c.name)
        enrolled = ops.resolve_clients(settings, [], all_=True)
        send = make_app(settings).send_task
        for _ in range(2):
            round_id = ops.start_round(settings, enrolled, send)
            try:
                ops.wait_round(settings, round_id, timeout=180, show=False)
            except ops.OperationError as exc:
                fail_with_logs(f"round {round_id}: {exc}", logs)
        reject_one_update(settings, logs)
        evaluate_with_a_retry(run)
        yield run
    finally:
        for p in run.procs:  # all shut down at once, then wait for each
            if p.poll() is None:
                p.terminate()
        for p in run.procs:
            processes.stop(p)
        if prometheus_proc is not None:
            processes.stop(prometheus_proc)
        stop_s3()
        drop()


# --- /metrics of each process ----------------------------------------------------------
@pytest.mark.slow
def test_each_process_serves_its_key_series(run: Run) -> None:
    worker = scrape(run.ports["worker"])
    aggregator = scrape(run.ports["aggregator"])
    exporter = scrape(run.ports["metrics"])
    for name, samples in (("worker", worker), ("aggregator", aggregator), ("metrics", exporter)):
        (labels, value), *_ = samples["fedvec_build_info"]
        assert value == 1 and labels["version"], name

    positive = {
        "worker": [
            (worker, "fedvec_finetune_seconds_count", {}),
            (worker, "fedvec_finetune_samples_total", {}),
            (worker, "fedvec_finetune_tokens_total", {}),
            (worker, "fedvec_finetune_samples_per_second", {}),
            (worker, "fedvec_finetune_tokens_per_second", {}),
            (worker, "fedvec_tasks_total", {"task": "train", "outcome": "succeeded"}),
            (worker, "fedvec_tasks_total", {"task": "evaluate", "outcome": "succeeded"}),
            (worker, "fedvec_object_store_bytes_total", {"operation": "put"}),
            (worker, "fedvec_object_store_bytes_total", {"operation": "get"}),
            (worker, "fedvec_object_store_seconds_count", {"operation": "put"}),
        ],
        "aggregator": [
            (aggregator, "fedvec_updates_received_total", {}),
            (aggregator, "fedvec_updates_aggregated_total", {}),
            (aggregator, "fedvec_updates_rejected_total", {}),
            (aggregator, "fedvec_events_total", {"outcome": "round-aggregated"}),
            (aggregator, "fedvec_events_total", {"outcome": "rejected"}),
            (aggregator, "fedvec_regroup_events_total", {}),
            (aggregator, "fedvec_rounds_completed_total", {}),
            (aggregator, "fedvec_aggregation_seconds_count", {}),
            (aggregator, "fedvec_update_to_personalized_seconds_count", {}),
            (aggregator, "fedvec_update_staleness_count", {}),
            (aggregator, "fedvec_similarity_index_entries", {}),
            (aggregator, "fedvec_groups_current", {}),
            (aggregator, "fedvec_group_size_count", {}),
            (aggregator, "fedvec_tasks_total", {"task": "aggregate", "outcome": "succeeded"}),
            (aggregator, "fedvec_tasks_total", {"task": "aggregate", "outcome": "retried"}),
            (aggregator, "fedvec_task_retries_total", {"task": "aggregate"}),
            (aggregator, "fedvec_events_total", {"outcome": "evaluated"}),
            (aggregator, "fedvec_object_store_bytes_total", {"operation": "get"}),
            (aggregator, "fedvec_object_store_bytes_total", {"operation": "put"}),
        ],
        "metrics": [
            (exporter, "fedvec_database_up", {}),
            (exporter, "fedvec_clients", {}),
            (exporter, "fedvec_updates", {"status": "aggregated"}),
            (exporter, "fedvec_updates", {"status": "rejected"}),
            (exporter, "fedvec_personalized_adapters", {}),
            (exporter, "fedvec_groups", {}),
            (exporter, "fedvec_grouping_version", {}),
            (exporter, "fedvec_group_members", {}),
            (exporter, "fedvec_similarity_index_size", {}),
            (exporter, "fedvec_last_round", {}),
        ],
    }
    missing = [
        f"{role}: {name}{labels or ''} = {total(samples, name, **labels)}"
        for role, checks in positive.items()
        for samples, name, labels in checks
        if not total(samples, name, **labels) > 0
    ]
    assert not missing, "series missing or zero:\n" + "\n".join(missing)

    assert total(aggregator, "fedvec_updates_rejected_total") == 1
    assert total(exporter, "fedvec_clients") == len(run.clients)
    assert total(exporter, "fedvec_updates", status="aggregated") == 4  # 2 clients x 2 rounds
    assert total(exporter, "fedvec_last_round") > 0
    assert {lab["queue"] for lab, _ in exporter["fedvec_queue_depth"]} >= {"train", "aggregate"}
    for client in run.clients:  # per-client series: every enrolled client, sensible values
        assert total(exporter, "fedvec_client_last_update_age_seconds", client=client) >= 0
        assert total(exporter, "fedvec_client_personalized_version", client=client) == 2
        assert 0 <= total(exporter, "fedvec_client_accuracy", client=client) <= 1
        assert total(exporter, "fedvec_client_group", client=client) >= 0


# --- a real Prometheus -----------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    panels = list(board["panels"])
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])  # panels of collapsed rows
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_rules() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for g in groups for rule in g["rules"]]


def query(base: str, promql: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        return json.loads(http_get(url))
    except urllib.error.HTTPError as exc:  # 400: a parse or evaluation error, in JSON
        return json.loads(exc.read())


def prometheus_url(run: Run) -> str:
    if run.prometheus is None:
        unavailable("prometheus", FileNotFoundError("not on PATH (make monitoring-tools)"))
    assert run.prometheus is not None
    return run.prometheus


@pytest.mark.slow
def test_prometheus_answers_every_dashboard_panel_and_alert_rule(run: Run) -> None:
    base = prometheus_url(run)

    def has(promql: str) -> bool:
        return bool(query(base, promql)["data"]["result"])

    # Wait for scrapes that saw the end of the run: the evaluation is its last event
    evaluated = 'fedvec_tasks_total{task="evaluate",outcome="succeeded"}'
    wait_until(
        "prometheus to scrape the run",
        lambda: has(evaluated) and has("fedvec_client_accuracy"),
        30,
        run.home / "logs",
    )
    time.sleep(2)  # a couple more scrapes, so that every rate() window has two points
    targets = json.loads(http_get(base + "/api/v1/targets"))["data"]["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets) == sorted(f"fedvec-{r}" for r in ROLES)
    assert all(t["health"] == "up" for t in targets), targets

    # The client variable's values: label_values(fedvec_client_last_update_age_seconds, client)
    values = json.loads(
        http_get(
            base
            + "/api/v1/label/client/values?"
            + urllib.parse.urlencode({"match[]": "fedvec_client_last_update_age_seconds"})
        )
    )["data"]
    assert sorted(values) == sorted(run.clients)

    # Grafana's variables: a window the whole run fills (Prometheus scraped all of it)
    window = f"{int(time.time() - run.prometheus_started) + 5}s"
    substitutions = {
        "$__rate_interval": window,
        "$__interval": window,
        "$__range": window,
        "$client": run.clients[0],
    }
    problems = []
    queries = dashboard_queries()
    assert len(queries) >= 30
    for title, expr in queries:
        promql = expr
        for var, value in substitutions.items():
            promql = promql.replace(var, value)
        assert "$" not in promql, f"{title}: unknown variable in {expr}"
        answer = query(base, promql)
        if answer["status"] != "success":
            problems.append(f"{title}: {expr}: {answer.get('error')}")
            continue
        result = answer["data"]["result"]
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite:
            problems.append(f"{title}: {expr}: no data ({result})")
    assert not problems, "dashboard queries without data:\n" + "\n".join(problems)

    for name, expr in alert_rules():
        answer = query(base, expr)
        assert answer["status"] == "success", f"{name}: {answer.get('error')}"
    # the rules Prometheus loaded are these, and their evaluation raised no error
    loaded = json.loads(http_get(base + "/api/v1/rules"))["data"]["groups"]
    rules = {r["name"]: r for g in loaded for r in g["rules"]}
    assert sorted(rules) == sorted(name for name, _ in alert_rules())
    assert all(r["health"] == "ok" for r in rules.values()), rules
    # a healthy run: nothing fires (FedvecUpdatesRejected needs a rejection it saw happen)
    firing = [n for n, r in rules.items() if r["state"] == "firing"]
    assert not firing or firing == ["FedvecUpdatesRejected"], firing


# --- promtool --------------------------------------------------------------------------
def promtool(*args: str, cwd: Path = ROOT) -> None:
    out = subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_accepts_the_prometheus_configs(name: str) -> None:
    promtool("check", "config", str(PROMETHEUS_DIR / name))  # loads alerts.yml beside it


def test_promtool_accepts_the_k8s_configmap(tmp_path: Path) -> None:
    (configmap,) = [
        d
        for d in yaml.safe_load_all(K8S_PROMETHEUS.read_text())
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-config"
    ]
    for key, content in configmap["data"].items():  # as mounted in /etc/prometheus
        (tmp_path / key).write_text(content)
    promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool("check", "rules", str(ALERTS))
    promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
