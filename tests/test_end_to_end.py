"""End to end with a real Celery worker process and the aggregator process (no eager
mode), 3 clients, 2 synchronous rounds, a few LoRA steps each: on the embedded default
(SQLite, local folder, filesystem broker) and distributed (PostgreSQL, S3 server, Redis),
the same code with other settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sqlalchemy import func, select

from aggregator.sketch import from_bytes, sketch_state_dict
from schema.models import (
    Evaluation,
    GroupMember,
    PersonalizedAdapter,
    SimilarityEdge,
    Update,
)
from services import adapter_store as ads
from services import operations as ops
from services import processes
from services.celery_app import make_app
from services.client_data import load_examples
from services.context import object_store
from services.db import session_scope, upgrade
from services.demo_data import build_demo_clients
from services.s3_server import start_s3_server
from services.settings import load_settings
from tests.conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    create_postgres_database,
    redis_broker_url,
    unavailable,
)
from workers.model import ModelRuntime, load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def run(request, tmp_path_factory):
    """One real run per deployment, shared by the assertions below."""
    home = tmp_path_factory.mktemp("e2e")
    settings = load_settings(environ={}, dotenv=home / "no.env").replace(
        home=str(home),
        max_steps=3,
        batch_size=4,
        max_length=64,
        torch_threads=1,
        strategy="fedbip",
    )
    if request.param == "distributed":
        url, drop = create_postgres_database()
        request.addfinalizer(drop)
        try:
            endpoint, stop = start_s3_server()
        except RuntimeError as exc:
            unavailable("S3 test server", exc)
        request.addfinalizer(stop)
        settings = settings.replace(
            database_url=url,
            broker_url=redis_broker_url(),
            object_store_url="s3://fedvec-e2e",
            s3_endpoint=endpoint,
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
        )
    clients = build_demo_clients(home / "data", train_per_client=16, test_per_client=8)
    chosen = [clients[0], clients[1], clients[3]]  # two news clients, one tweets client
    upgrade(settings.resolved_database_url)
    for c in chosen:
        ops.enroll(settings, c.name, c.train_path, test=c.test_path, task=c.task)
    enrolled = ops.resolve_clients(settings, [], all_=True)
    send = make_app(settings).send_task
    with processes.service(settings, home / "logs") as procs:
        try:
            for _ in range(2):
                rid = ops.start_round(settings, enrolled, send)
                ops.wait_round(settings, rid, timeout=300, show=False)
            evals = ops.evaluate(settings, enrolled, send, timeout=300, show=False)
        except ops.OperationError:
            for p in procs:
                print(p.args, p.poll())
            for log in sorted((home / "logs").glob("*.log")):
                print(log, log.read_text()[-3000:])
            raise
    return settings, chosen, enrolled, evals


def test_updates_edges_groups_and_adapters_exist(run):
    settings, chosen, enrolled, evals = run
    db = settings.resolved_database_url
    store = object_store(settings)
    with session_scope(db) as s:
        updates = list(s.scalars(select(Update)))
        assert len(updates) == 6
        assert {u.status for u in updates} == {"aggregated"}
        for u in updates:
            assert ads.sha256(store.get(u.adapter_key)) == u.adapter_sha256
            assert ads.sha256(store.get(u.task_vector_key)) == u.task_vector_sha256
            assert u.steps == 3
            # the worker's sketch is the sketch of the τ it stored
            tau = ads.get_state(store, u.task_vector_key, max_bytes=2**30)
            expected = sketch_state_dict(tau, settings.sketch_dim, settings.sketch_seed)
            assert torch.allclose(from_bytes(u.sketch, settings.sketch_dim), expected, atol=1e-5)
        assert s.scalar(select(func.count()).select_from(SimilarityEdge)) == 6
        assert {m.client_id for m in s.scalars(select(GroupMember))} == {c.id for c in enrolled}
        adapters = list(s.scalars(select(PersonalizedAdapter)))
        assert sorted((a.client_id, a.version) for a in adapters) == sorted(
            (c.id, v) for c in enrolled for v in (1, 2)
        )
        for a in adapters:
            assert store.exists(a.key)
        assert s.scalar(select(func.count()).select_from(Evaluation)) == 3
    assert {e["adapter_version"] for e in evals} == {2}
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evals)


def test_exported_adapter_loads_with_peft_and_matches_the_worker(run, tmp_path):
    settings, chosen, enrolled, evals = run
    client = enrolled[0]
    info = ops.export_adapter(settings, client, tmp_path / "adapter")
    assert info["version"] == 2
    examples = load_examples(chosen[0].test_path)[:4]

    # the worker's code path, with the stored adapter
    runtime = ModelRuntime(settings)
    with session_scope(settings.resolved_database_url) as s:
        row = s.scalars(
            select(PersonalizedAdapter).where(
                PersonalizedAdapter.client_id == client.id, PersonalizedAdapter.version == 2
            )
        ).one()
    runtime.load_adapter(ads.get_state(object_store(settings), row.key, max_bytes=2**30))
    expected = runtime.predict(examples)

    # a plain peft user
    model = PeftModel.from_pretrained(load_base_model(settings.model_path), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        for ex, exp in zip(examples, expected, strict=True):
            enc = runtime.tokenizer(
                [ex.prompt] * len(ex.options),
                list(ex.options),
                truncation="only_first",
                max_length=settings.max_length,
                padding=True,
                return_tensors="pt",
            )
            got = model(**enc).logits.squeeze(-1)
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
    # the accuracy the worker recorded is what the exported model gives
    all_examples = load_examples(chosen[0].test_path)
    runtime.load_adapter(ads.get_state(object_store(settings), row.key, max_bytes=2**30))
    acc = runtime.evaluate(all_examples).score
    worker_acc = next(e["accuracy"] for e in evals if e["client_id"] == client.id)
    assert acc == pytest.approx(worker_acc)


def test_the_readmes_peft_snippet_runs_as_written(run, tmp_path, monkeypatch):
    """Issue 20: the README's loading snippet, run as it is printed, on an export."""
    settings, _, enrolled, _ = run
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.S)
        if "PeftModel.from_pretrained" in block
    ]
    monkeypatch.chdir(tmp_path)
    ops.export_adapter(settings, enrolled[0], tmp_path / "out" / "adapter")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["scores"].shape == (2,) and torch.isfinite(scope["scores"]).all()
