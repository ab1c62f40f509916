"""The deployment files (infra/, Procfile, .dockerignore) agree with the code and with each
other: every FEDVEC_* name is a setting, every fedvec command line parses with the real CLI,
metrics ports match between processes and scrape configs, the aggregator has one replica,
images pin a tag, Kubernetes references resolve. Parses files only: no docker, no cluster,
no network."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import honcho.environ
import pytest
import yaml

from services.cli import cli
from services.settings import ENV_NAMES, load_settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "fedvec.env.example"
FEDVEC_IMAGE = "fedvec"  # the repository name of infra/Dockerfile's image

# The processes that serve /metrics, named as their fedvec subcommand and Prometheus job
# (fedvec-<role>); their ports come from the Procfile.
ROLES = ("worker", "aggregator", "metrics")
# Settings a distributed deployment cannot do without (the defaults are embedded-only).
REQUIRED = {
    "FEDVEC_DATABASE_URL": "postgresql+psycopg://",
    "FEDVEC_BROKER_URL": "redis://",
    "FEDVEC_OBJECT_STORE_URL": "s3://",
    "FEDVEC_S3_ENDPOINT": "",
    "FEDVEC_S3_ACCESS_KEY": "",
    "FEDVEC_S3_SECRET_KEY": "",
}
SECRET_SETTINGS = {"FEDVEC_DATABASE_URL", "FEDVEC_S3_ACCESS_KEY", "FEDVEC_S3_SECRET_KEY"}
PLACEHOLDER = "CHANGE-ME"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --- reading the files ----------------------------------------------------------------
def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


YAML_FILES = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml")])
COMPOSE: dict[str, Any] = load_yaml_all(COMPOSE_FILE)[0]
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
KUSTOMIZATION: dict[str, Any] = load_yaml_all(K8S / "kustomization.yaml")[0]
K8S_FILES = sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")
K8S_OBJECTS: list[tuple[str, dict[str, Any]]] = [
    (path.name, obj) for path in K8S_FILES for obj in load_yaml_all(path)
]


def k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for _, o in K8S_OBJECTS if o.get("kind") == kind}


_SHELL_VAR = re.compile(r"\$\{(\w+)(:?-([^}]*))?\}|\$(\w+)")


def shell_defaults(text: str, strict: bool = True) -> str:
    """`text` with each ${VAR:-default} replaced by its default, as the shell (honcho) or
    compose would expand it with VAR unset. A variable without a default has no known value
    here: refused when `strict` (command lines), else left as it is."""

    def sub(m: re.Match[str]) -> str:
        if m.group(2) is None:
            if not strict:
                return m.group(0)
            raise AssertionError(f"{text!r}: ${m.group(1) or m.group(4)} has no default")
        return m.group(3)

    return _SHELL_VAR.sub(sub, text)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            assert "=" in line, f"{path.name}: not KEY=VALUE: {raw!r}"
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def image_tag(image: str) -> str:
    """The tag of an image reference ('' when it has none; a registry port is no tag)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def image_repo(image: str) -> str:
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


# `fedvec --log-level X ...`: the group's options that take a value
GROUP_VALUE_OPTIONS = {
    opt for p in cli.params if isinstance(p, click.Option) and not p.is_flag for opt in p.opts
}


@dataclass
class Invocation:
    """One fedvec process a deployment file starts: `fedvec ARGS` with ENV set."""

    where: str
    args: list[str]
    env: dict[str, str | None] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """The subcommand (`db` for `db upgrade`), skipping the group's own options."""
        args = iter(self.args)
        for arg in args:
            if not arg.startswith("-"):
                return arg
            if arg in GROUP_VALUE_OPTIONS:
                next(args, None)
        return ""

    @property
    def metrics_port(self) -> int | None:
        """Where this process serves /metrics: `--port N` (the exporter) or
        FEDVEC_METRICS_PORT."""
        for i, arg in enumerate(self.args):
            if arg == "--port" and i + 1 < len(self.args):
                return int(self.args[i + 1])
            if arg.startswith("--port="):
                return int(arg.split("=", 1)[1])
        port = self.env.get("FEDVEC_METRICS_PORT")
        return int(port) if port else None


def procfile() -> dict[str, Invocation]:
    text = (ROOT / "Procfile").read_text()
    parsed = honcho.environ.parse_procfile(text).processes  # what `honcho start` runs
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(parsed) == len(lines), "honcho ignores a malformed line silently"
    procs = {}
    for name, command in parsed.items():
        # honcho runs the line through a shell: leading VAR=value words set the environment
        words = shlex.split(shell_defaults(command))
        env: dict[str, str | None] = {}
        while words and re.match(r"[A-Za-z_]\w*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        assert words[:1] == ["fedvec"], f"Procfile {name}: runs {words[:1]}, not fedvec"
        procs[name] = Invocation(f"Procfile {name}", words[1:], env)
    return procs


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=VALUE" list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else shell_defaults(str(v), strict=False) for k, v in env.items()}


def is_fedvec_service(service: dict[str, Any]) -> bool:
    return image_repo(service.get("image", "")) == FEDVEC_IMAGE or "build" in service


def compose_invocations() -> dict[str, Invocation]:
    out = {}
    for name, svc in SERVICES.items():
        if not is_fedvec_service(svc):
            continue
        # the image's ENTRYPOINT is fedvec: `command` holds fedvec's arguments
        assert svc.get("entrypoint") in (None, ["fedvec"], "fedvec"), name
        command = svc.get("command", [])
        if isinstance(command, str):
            command = shlex.split(command)
        args = [shell_defaults(str(a)) for a in command]
        out[name] = Invocation(f"compose {name}", args, compose_env(svc))
    return out


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") not in POD_KINDS:
        return None
    return obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def literal_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def k8s_settings() -> dict[str, str]:
    """What the fedvec containers get from the ConfigMap and the Secret."""
    return {
        **k8s("ConfigMap")["fedvec-config"]["data"],
        **k8s("Secret")["fedvec-secrets"]["stringData"],
    }


def k8s_invocations() -> list[tuple[dict[str, Any], dict[str, Any], Invocation]]:
    """(workload, container, invocation) for every container running the fedvec image."""
    out = []
    for fname, obj in K8S_OBJECTS:
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            if image_repo(c["image"]) != FEDVEC_IMAGE:
                continue
            command = c.get("command", ["fedvec"])
            assert command[:1] == ["fedvec"], f"{fname} {c['name']}: command {command}"
            args = [*command[1:], *c.get("args", [])]
            env = literal_env(c)
            where = f"{fname} {obj['kind']}/{obj['metadata']['name']} {c['name']}"
            out.append((obj, c, Invocation(where, args, env)))
    return out


def all_invocations() -> list[Invocation]:
    return [
        *procfile().values(),
        *compose_invocations().values(),
        *(inv for _, _, inv in k8s_invocations()),
    ]


def parse_cli(args: list[str]) -> click.Context:
    """Parse `fedvec ARGS` the way the CLI would, down to the subcommand, without running
    anything: an unknown command or option, a missing argument or a bad value raises."""
    ctx = cli.make_context("fedvec", list(args))
    command: click.Command = cli
    while isinstance(command, click.Group):
        # a group leaves its subcommand and the rest unparsed (click >= 8.2 keeps the
        # subcommand in `_protected_args`; `protected_args` is the older, public name)
        head = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*head, *ctx.args]
        assert rest, f"fedvec {' '.join(args)}: no subcommand"
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None, f"fedvec {' '.join(args)}: no command {name!r}"
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


PROCS = procfile()
PORTS: dict[str, int | None] = {
    role: PROCS[role].metrics_port if role in PROCS else None for role in ROLES
}


# --- files parse ----------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    assert load_yaml_all(path), f"{path} is empty"


def test_expected_files_exist():
    for rel in [
        "Dockerfile",
        "docker-compose.yml",
        "fedvec.env.example",
        "README.md",
        "prometheus/prometheus.yml",
        "prometheus/prometheus-compose.yml",
        "prometheus/alerts.yml",
        "prometheus/alerts.test.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/fedvec.yml",
        "grafana/dashboards/fedvec.json",
        "k8s/kustomization.yaml",
    ]:
        assert (INFRA / rel).is_file(), rel
    assert (ROOT / ".dockerignore").is_file()


# --- settings names and values --------------------------------------------------------
def test_every_fedvec_name_in_the_deployment_files_is_a_setting():
    texts = [p for p in INFRA.rglob("*") if p.is_file()] + [ROOT / "Procfile"]
    for path in texts:
        for name in re.findall(r"\bFEDVEC_[A-Z0-9_]+", path.read_text()):
            assert name in ENV_NAMES, f"{path.relative_to(ROOT)}: {name} is not a setting"


def test_variables_set_by_compose_k8s_procfile_and_env_example_are_settings():
    named: list[tuple[str, str]] = [(k, "env example") for k in read_env_file(ENV_EXAMPLE)]
    for inv in all_invocations():
        named += [(k, inv.where) for k in inv.env]
    for name, svc in SERVICES.items():
        named += [(k, f"compose {name}") for k in compose_env(svc)]
    for kind in ("ConfigMap", "Secret"):
        for name, obj in k8s(kind).items():
            keys = {**obj.get("data", {}), **obj.get("stringData", {})}
            named += [(k, f"{kind}/{name}") for k in keys]
    for _, obj in K8S_OBJECTS:
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            named += [(k, f"{obj['metadata']['name']} {c['name']}") for k in literal_env(c)]
    fedvec = [(k, where) for k, where in named if k.startswith("FEDVEC_")]
    assert len(fedvec) > 20
    wrong = [f"{where}: {k}" for k, where in fedvec if k not in ENV_NAMES]
    assert not wrong, f"not in services.settings.ENV_NAMES: {wrong}"


def test_env_example_sets_a_whole_deployment_with_valid_values(tmp_path):
    values = read_env_file(ENV_EXAMPLE)
    for key, prefix in REQUIRED.items():
        assert values.get(key, "").startswith(prefix) and values[key], key
    for key in SECRET_SETTINGS:
        assert PLACEHOLDER in values[key], f"{key}: secrets in the example are placeholders"
    fedvec = {k: v for k, v in values.items() if k.startswith("FEDVEC_")}
    load_settings(environ=fedvec, dotenv=tmp_path / "none.env")  # types convert
    # compose's Postgres is created with the password the URL uses
    assert urlsplit(values["FEDVEC_DATABASE_URL"]).password == values["POSTGRES_PASSWORD"]
    for per_process in ("FEDVEC_METRICS_PORT", "FEDVEC_DEVICE", "FEDVEC_SITE"):
        assert per_process not in values, f"{per_process} is set per service, not shared"


def test_k8s_configmap_and_secret_set_a_whole_deployment(tmp_path):
    config = k8s("ConfigMap")["fedvec-config"]["data"]
    secret = k8s("Secret")["fedvec-secrets"]["stringData"]
    merged = k8s_settings()
    for key, prefix in REQUIRED.items():
        assert str(merged.get(key, "")).startswith(prefix) and merged[key], key
    assert SECRET_SETTINGS <= set(secret), "secrets belong in the Secret"
    assert not SECRET_SETTINGS & set(config), "no secret in the ConfigMap"
    for name, obj in k8s("Secret").items():
        for key, value in obj["stringData"].items():
            assert PLACEHOLDER in value, f"Secret/{name} {key}: placeholder values only"
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values are strings"
    load_settings(environ=merged, dotenv=tmp_path / "none.env")
    infra = k8s("Secret")["fedvec-infra-secrets"]["stringData"]
    assert urlsplit(secret["FEDVEC_DATABASE_URL"]).password == infra["POSTGRES_PASSWORD"]


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_backing_services_are_where_the_settings_point(where):
    if where == "compose":
        values = read_env_file(ENV_EXAMPLE)
        hosts = {name: None for name in SERVICES}  # compose does not declare ports
        postgres = compose_env(SERVICES["postgres"])
        minio_init = SERVICES["minio-init"]["command"]
    else:
        values = k8s_settings()
        hosts = {n: [p["port"] for p in s["spec"]["ports"]] for n, s in k8s("Service").items()}
        postgres = literal_env(pod_spec(k8s("StatefulSet")["postgres"])["containers"][0])
        minio_init = pod_spec(k8s("Job")["minio-init"])["containers"][0]["args"]
    db = urlsplit(values["FEDVEC_DATABASE_URL"])
    broker = urlsplit(values["FEDVEC_BROKER_URL"])
    s3 = urlsplit("//" + values["FEDVEC_S3_ENDPOINT"])
    for url in (db, broker, s3):
        assert url.hostname in hosts, f"{where} has no service {url.hostname}"
        assert hosts[url.hostname] is None or url.port in hosts[url.hostname], url.netloc
    # the database that Postgres creates is the one the URL names
    assert db.username == postgres["POSTGRES_USER"]
    assert db.path.lstrip("/") == postgres["POSTGRES_DB"]
    # minio-init creates the bucket of FEDVEC_OBJECT_STORE_URL
    bucket = urlsplit(values["FEDVEC_OBJECT_STORE_URL"]).netloc
    assert minio_init[0] == "mb" and minio_init[-1] == f"local/{bucket}", minio_init


# --- command lines --------------------------------------------------------------------
@pytest.mark.parametrize("inv", all_invocations(), ids=lambda i: i.where)
def test_every_fedvec_command_line_is_a_real_cli_invocation(inv):
    try:
        ctx = parse_cli(inv.args)
    except click.ClickException as exc:
        pytest.fail(f"{inv.where}: `fedvec {' '.join(inv.args)}`: {exc.format_message()}")
    if inv.role == "worker":
        assert {"site", "device"} <= set(ctx.params), "fedvec worker --site/--device"


def test_processes_run_the_expected_commands():
    assert set(PROCS) == set(ROLES), "Procfile: worker, aggregator, metrics (migrate by hand)"
    for name, inv in PROCS.items():
        assert inv.role == name, inv.where
    compose = {name: inv.args for name, inv in compose_invocations().items()}
    assert compose["migrate"] == ["db", "upgrade"]
    for role in ROLES:
        assert compose_invocations()[role].role == role
    k8s_roles = Counter(inv.role for _, _, inv in k8s_invocations())
    assert set(k8s_roles) == {"db", *ROLES}, k8s_roles
    migrate = k8s("Job")["fedvec-migrate"]["spec"]["template"]["spec"]["containers"][0]
    assert migrate.get("args") == ["db", "upgrade"]


def test_a_site_worker_example_routes_by_site():
    site_workers = [
        (obj, inv)
        for obj, _, inv in k8s_invocations()
        if inv.role == "worker" and "--site" in inv.args
    ]
    assert site_workers, "a worker Deployment with --site"
    for obj, inv in site_workers:
        site = inv.args[inv.args.index("--site") + 1]
        selector = pod_spec(obj).get("nodeSelector", {})
        assert site in selector.values(), f"{inv.where}: runs on the site's nodes"
    assert any(
        inv.role == "worker" and "--site" not in inv.args and "FEDVEC_SITE" not in inv.env
        for _, _, inv in k8s_invocations()
    ), "a worker of the shared pool"


# --- ports ----------------------------------------------------------------------------
def test_procfile_gives_each_metrics_process_its_own_port():
    assert PORTS == {"worker": 9101, "aggregator": 9102, "metrics": 9103}


def scrape_ports(config: dict[str, Any]) -> dict[str, tuple[set[int], list[str]]]:
    """job name -> (ports scraped, host names) of a Prometheus config, checked for shape."""
    assert config["global"]["scrape_interval"]
    jobs: dict[str, tuple[set[int], list[str]]] = {}
    for job in config["scrape_configs"]:
        name = job["job_name"]
        assert name not in jobs, f"job {name} twice"
        ports: set[int] = set()
        hosts: list[str] = []
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                ports.add(int(port))
                hosts.append(host)
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A" and dns["port"]
            ports.add(int(dns["port"]))
            hosts += dns["names"]
        assert ports, f"job {name} scrapes nothing"
        jobs[name] = (ports, hosts)
    return jobs


PROMETHEUS_CONFIGS = {
    "prometheus.yml": load_yaml_all(INFRA / "prometheus/prometheus.yml")[0],
    "prometheus-compose.yml": load_yaml_all(INFRA / "prometheus/prometheus-compose.yml")[0],
    "k8s prometheus-config": yaml.safe_load(
        k8s("ConfigMap")["prometheus-config"]["data"]["prometheus.yml"]
    ),
}


@pytest.mark.parametrize("name", PROMETHEUS_CONFIGS)
def test_prometheus_scrapes_every_process_on_its_procfile_port(name):
    jobs = scrape_ports(PROMETHEUS_CONFIGS[name])
    fedvec_jobs = {j for j in jobs if j.startswith("fedvec-")}
    assert fedvec_jobs == {f"fedvec-{role}" for role in ROLES}
    for role in ROLES:
        ports, hosts = jobs[f"fedvec-{role}"]
        assert ports == {PORTS[role]}, (name, role, ports)
        if name == "prometheus.yml":
            assert set(hosts) == {"127.0.0.1"}, "the Procfile's processes run on this host"
        elif name == "prometheus-compose.yml":
            assert set(hosts) <= set(SERVICES), hosts
        else:
            for host in hosts:
                svc = k8s("Service")[host]["spec"]
                assert PORTS[role] in [p["port"] for p in svc["ports"]], host
                if role == "worker":  # DNS discovery needs one record per pod
                    assert svc.get("clusterIP") == "None", host


def test_every_prometheus_config_loads_the_alert_rules():
    alerts = load_yaml_all(INFRA / "prometheus/alerts.yml")[0]
    for name, config in PROMETHEUS_CONFIGS.items():
        assert config.get("rule_files") == ["alerts.yml"], name  # beside the config file
    # compose mounts alerts.yml beside the config; k8s ships a copy in the same ConfigMap,
    # mounted as the config's folder
    mounts = dict(v.split(":")[:2] for v in SERVICES["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus-compose.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    configmap = k8s("ConfigMap")["prometheus-config"]["data"]
    assert yaml.safe_load(configmap["alerts.yml"]) == alerts, "k8s copy of alerts.yml"
    spec = pod_spec(k8s("StatefulSet")["prometheus"])
    (container,) = spec["containers"]
    config_arg = next(a for a in container["args"] if a.startswith("--config.file="))
    folder = config_arg.split("=", 1)[1].rsplit("/", 1)[0]
    volume = next(
        v for v in spec["volumes"] if v.get("configMap", {}).get("name") == "prometheus-config"
    )
    assert {"name": volume["name"], "mountPath": folder} in container["volumeMounts"]


# metric names the code defines: prometheus_client families and the exporter's gauges
METRIC_SOURCES = [ROOT / "services/metrics.py", ROOT / "services/metrics_exporter.py"]


def defined_metrics() -> set[str]:
    return {n for p in METRIC_SOURCES for n in re.findall(r'"(fedvec_\w+)"', p.read_text())}


def used_metrics(promql: str) -> set[str]:
    """fedvec metric families a PromQL expression reads (histogram series suffixes off)."""
    names = re.findall(r"\bfedvec_\w+", promql)
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in board["panels"]:
        panels += [panel, *panel.get("panels", [])]  # collapsed rows hold their panels
    return panels


def test_grafana_dashboard_rows_panels_and_variables():
    board = json.loads((INFRA / "grafana/dashboards/fedvec.json").read_text())
    assert board["uid"] == "fedvec"
    panels = dashboard_panels(board)
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Service overview", "Aggregation", "Groups", "Workers", "Per client"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["client"]["definition"] == (
        "label_values(fedvec_client_last_update_age_seconds, client)"
    )
    for panel in panels:
        if panel["type"] == "row":
            continue
        # the datasource variable: works provisioned and imported into any Grafana
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
    # no two panels overlap on Grafana's 24-column grid
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_dashboard_and_alerts_read_only_metrics_the_code_defines():
    defined = defined_metrics()
    assert len(defined) > 30
    board = json.loads((INFRA / "grafana/dashboards/fedvec.json").read_text())
    exprs = [t["expr"] for p in dashboard_panels(board) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    rules = load_yaml_all(INFRA / "prometheus/alerts.yml")[0]["groups"]
    exprs += [r["expr"] for g in rules for r in g["rules"]]
    unknown = {n for e in exprs for n in used_metrics(e)} - defined
    assert not unknown, f"not defined in {[p.name for p in METRIC_SOURCES]}: {unknown}"
    # every job an expression names is one the scrape configs have
    jobs = {j for e in exprs for j in re.findall(r'job="([^"]+)"', e)}
    assert jobs <= {f"fedvec-{role}" for role in ROLES}, jobs


def test_compose_processes_serve_metrics_on_the_procfile_ports():
    invocations = compose_invocations()
    for role in ROLES:
        svc, port = SERVICES[role], invocations[role].metrics_port
        assert port == PORTS[role], role
        assert str(port) in [str(p) for p in svc.get("expose", [])], role
        assert f":{port}/metrics" in " ".join(svc["healthcheck"]["test"]), role


def test_k8s_processes_serve_metrics_on_the_procfile_ports():
    seen = set()
    for _, c, inv in k8s_invocations():
        if inv.role not in ROLES:
            continue
        seen.add(inv.role)
        assert inv.metrics_port == PORTS[inv.role], inv.where
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        assert ports.get("metrics") == PORTS[inv.role], inv.where
        assert c["livenessProbe"]["httpGet"]["port"] in ("metrics", PORTS[inv.role]), inv.where
    assert seen == set(ROLES)


def test_dockerfile_exposes_the_procfile_ports():
    text = (INFRA / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == set(PORTS.values())


# --- replicas, images -----------------------------------------------------------------
def test_exactly_one_aggregator():
    assert sum(inv.role == "aggregator" for inv in PROCS.values()) == 1
    compose = [n for n, inv in compose_invocations().items() if inv.role == "aggregator"]
    assert compose == ["aggregator"]
    assert SERVICES["aggregator"].get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in SERVICES["aggregator"]
    workloads = [obj for obj, _, inv in k8s_invocations() if inv.role == "aggregator"]
    assert len(workloads) == 1 and workloads[0]["kind"] == "Deployment"
    assert workloads[0]["spec"]["replicas"] == 1
    assert workloads[0]["spec"]["strategy"]["type"] == "Recreate"  # never two at once


def all_images() -> list[tuple[str, str]]:
    images = [(f"compose {n}", s["image"]) for n, s in SERVICES.items()]
    for fname, obj in K8S_OBJECTS:
        spec = pod_spec(obj)
        images += [(f"{fname} {c['name']}", c["image"]) for c in (containers(spec) if spec else [])]
    text = (INFRA / "Dockerfile").read_text()
    images += [("Dockerfile", m) for m in re.findall(r"^FROM\s+(\S+)", text, re.M)]
    return images


def test_images_pin_a_tag():
    images = all_images()
    assert len(images) > 15
    for where, image in images:
        assert image_tag(image) not in ("", "latest") or "@sha256:" in image, (where, image)
    for override in KUSTOMIZATION.get("images", []):
        assert override.get("newTag") not in (None, "", "latest") or override.get("digest")


def test_dockerfile_builds_what_the_makefile_installs():
    text = (INFRA / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert re.search(rf"pip install --index-url \S+ {re.escape(torch_pin)}\b", text)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    demo_data = re.search(r"--no-deps (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install --no-deps {demo_data.strip()}" in text
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        folder = package.rstrip("*")
        assert re.search(rf"^COPY {folder} ", text, re.M), f"the image lacks {folder}/"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["fedvec"\]$', text, re.M)
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert {".venv", ".fedvec", ".git", ".env"} <= set(ignored)
    for line in re.findall(r"^COPY (.+) \S+$", text, re.M):  # sources must reach the build
        for source in line.split():
            assert (ROOT / source).exists() and source not in ignored, source


# --- compose --------------------------------------------------------------------------
def test_compose_services_start_in_order_and_report_health():
    for name, svc in SERVICES.items():
        assert "image" in svc, name
        one_shot = svc.get("restart") == "no"
        assert one_shot or "healthcheck" in svc, f"{name}: long-running without healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert cond["condition"] in (
                "service_healthy",
                "service_completed_successfully",
            ), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck"
            else:
                assert SERVICES[dep].get("restart") == "no", f"{dep} is not one-shot"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, inv in compose_invocations().items():
        if inv.role != "db":
            deps = SERVICES[name]["depends_on"]
            assert deps["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_worker_reserves_a_gpu():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert compose_env(worker)["FEDVEC_DEVICE"] == "cuda:0"


def test_compose_mounts_files_that_exist():
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):  # bind mounts of this repository's files
                assert (INFRA / source).exists(), f"{name}: {source}"
            elif not source.startswith(("$", "/")):
                assert source in COMPOSE.get("volumes", {}), f"{name}: volume {source}"
        if "env_file" in svc:
            assert svc["env_file"] == ".env", "the copy of fedvec.env.example"


# --- kubernetes -----------------------------------------------------------------------
def test_k8s_objects_are_well_formed_and_listed_in_the_kustomization():
    assert KUSTOMIZATION["kind"] == "Kustomization"
    resources = KUSTOMIZATION["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == sorted(p.name for p in K8S_FILES)
    keys = Counter()
    for fname, obj in K8S_OBJECTS:
        assert obj.get("apiVersion") and obj.get("kind"), fname
        assert obj.get("metadata", {}).get("name"), f"{fname}: {obj.get('kind')} without name"
        keys[(obj["kind"], obj["metadata"]["name"])] += 1
    assert [k for k, n in keys.items() if n > 1] == []
    assert {o["metadata"]["name"] for o in k8s("Namespace").values()} == {
        KUSTOMIZATION["namespace"]
    }
    for kind in ("StatefulSet", "Deployment", "Service", "ConfigMap", "Secret", "Job"):
        assert k8s(kind), kind


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_selectors_and_references_resolve():
    workloads = [o for _, o in K8S_OBJECTS if o["kind"] in POD_KINDS - {"Job"}]
    for obj in workloads:
        selector = obj["spec"]["selector"]["matchLabels"]
        assert matches(selector, pod_labels(obj)), obj["metadata"]["name"]
        for other in workloads:  # overlapping selectors make controllers fight over pods
            if other is not obj:
                assert not matches(selector, pod_labels(other)), obj["metadata"]["name"]
    pods = [o for _, o in K8S_OBJECTS if o["kind"] in POD_KINDS]
    for name, svc in k8s("Service").items():
        selected = [o for o in pods if matches(svc["spec"]["selector"], pod_labels(o))]
        assert selected, f"Service/{name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for o in selected:
                cports = [p for c in containers(pod_spec(o)) for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in cports), (
                    f"Service/{name} port {target} is not a port of {o['metadata']['name']}"
                )
    generated = {g["name"] for g in KUSTOMIZATION.get("configMapGenerator", [])}
    configmaps, secrets = set(k8s("ConfigMap")) | generated, set(k8s("Secret"))
    claims = set(k8s("PersistentVolumeClaim"))
    for obj in pods:
        spec = pod_spec(obj)
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in k8s("Secret")[ref["name"]]["stringData"], e["name"]
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, mount
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def site_of(inv: Invocation) -> str | None:
    return inv.args[inv.args.index("--site") + 1] if "--site" in inv.args else None


def test_k8s_fedvec_containers_read_only_fedvec_settings_from_config():
    """Server processes read the shared Secret; a site's worker reads only its site's."""
    sites = 0
    for _, c, inv in k8s_invocations():
        sources = c.get("envFrom", [])
        names = {s["configMapRef"]["name"] for s in sources if "configMapRef" in s}
        names |= {s["secretRef"]["name"] for s in sources if "secretRef" in s}
        site = site_of(inv)
        sites += site is not None
        wanted = f"fedvec-site-{site}" if site else "fedvec-secrets"
        assert names == {"fedvec-config", wanted}, inv.where
        assert [next(iter(s.values()))["name"] for s in sources][-1] == wanted, inv.where
    assert sites, "the site worker example"
    envs = [k8s("ConfigMap")["fedvec-config"]["data"]]
    envs += [
        o["stringData"]
        for n, o in k8s("Secret").items()
        if n == "fedvec-secrets" or (n.startswith("fedvec-site-") and not n.endswith("-keys"))
    ]
    for keys in envs:
        assert all(k in ENV_NAMES for k in keys), keys


def test_k8s_site_workers_hold_no_server_secret_and_their_own_keys():
    """Issue 17: a site holds no database URL, no admin credential, and its clients' keys
    from its own Secret, mounted read-only where FEDVEC_CLIENT_SECRETS_FILE points."""
    shared = k8s("Secret")["fedvec-secrets"]["stringData"]
    for obj, c, inv in k8s_invocations():
        site = site_of(inv)
        if site is None:
            continue
        secret = k8s("Secret")[f"fedvec-site-{site}"]["stringData"]
        assert "FEDVEC_DATABASE_URL" not in secret and "FEDVEC_DATABASE_URL" not in inv.env
        assert urlsplit(secret["FEDVEC_BROKER_URL"]).username == f"fedvec-site-{site}"
        for key in ("FEDVEC_S3_ACCESS_KEY", "FEDVEC_S3_SECRET_KEY"):
            assert secret[key] != shared[key], f"{key}: the site's own MinIO user"
        keys_file = Path(str(inv.env["FEDVEC_CLIENT_SECRETS_FILE"]))
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
        assert mount.get("readOnly") is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == f"fedvec-site-{site}-keys"
        assert keys_file.name in k8s("Secret")[source["secretName"]]["stringData"]
        assert (
            pod_spec(obj)["securityContext"]["fsGroup"]
            == pod_spec(obj)["securityContext"]["runAsUser"]
        ), "the worker's user reads the keys file (mode 0440, group fsGroup)"


def test_k8s_workers_have_a_gpu_each():
    workers = [(o, c, inv) for o, c, inv in k8s_invocations() if inv.role == "worker"]
    assert len(workers) >= 2  # the pool and the site example
    for _, c, inv in workers:
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1", inv.where
        device = inv.env.get("FEDVEC_DEVICE")
        if "--device" in inv.args:
            device = inv.args[inv.args.index("--device") + 1]
        assert device == "cuda:0", inv.where


def test_k8s_stateful_services_keep_their_data_on_volumes():
    for name in ("postgres", "redis", "minio"):
        sts = k8s("StatefulSet")[name]
        assert sts["spec"]["volumeClaimTemplates"], name
        assert k8s("Service")[name], name


def test_k8s_grafana_provisioning_copies_the_files():
    grafana = INFRA / "grafana/provisioning"
    copies = {
        "grafana-datasources": grafana / "datasources/prometheus.yml",
        "grafana-dashboard-providers": grafana / "dashboards/fedvec.yml",
    }
    for configmap, path in copies.items():
        (content,) = k8s("ConfigMap")[configmap]["data"].values()
        assert yaml.safe_load(content) == load_yaml_all(path)[0], configmap
    provider = load_yaml_all(grafana / "dashboards/fedvec.yml")[0]["providers"][0]
    mounts = [v for v in SERVICES["grafana"]["volumes"] if v.startswith("./grafana/dashboards:")]
    assert mounts and mounts[0].split(":")[1] == provider["options"]["path"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_into_one_namespace_with_the_pushed_image():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    generated = KUSTOMIZATION.get("configMapGenerator", [])
    assert len(objects) == len(K8S_OBJECTS) + len(generated)
    # the generated ConfigMap gets a content hash in its name; the volumes follow it
    dashboards = [o for o in objects if o["metadata"]["name"].startswith("grafana-dashboards-")]
    assert len(dashboards) == 1 and "fedvec.json" in dashboards[0]["data"]
    volumes = [v for o in objects if pod_spec(o) for v in pod_spec(o).get("volumes", [])]
    assert dashboards[0]["metadata"]["name"] in {
        v.get("configMap", {}).get("name") for v in volumes
    }
    namespace = KUSTOMIZATION["namespace"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
    (override,) = KUSTOMIZATION["images"]
    wanted = f"{override['newName']}:{override['newTag']}"
    rendered = [c["image"] for o in objects if pod_spec(o) for c in containers(pod_spec(o))]
    assert wanted in rendered
    assert not [i for i in rendered if image_repo(i) == FEDVEC_IMAGE and i != wanted]


def test_k8s_grafana_gets_the_same_dashboard():
    [gen] = [g for g in KUSTOMIZATION["configMapGenerator"] if g["name"] == "grafana-dashboards"]
    for rel in gen["files"]:
        copy = K8S / rel
        assert copy.read_bytes() == (INFRA / "grafana/dashboards" / copy.name).read_bytes(), rel
