"""`fedvec metrics`: gauges read from the database and the broker at scrape time, for
what no single worker or aggregator process knows (enrolled clients, updates by status,
groups, queue depths, each client's state). One such exporter per deployment.

Per-client series (label `client`, the client's name) live only here: enrollment bounds
them. Everything is counted by the database (GROUP BY, MAX), never row by row."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from schema.models import (
    Client,
    Evaluation,
    Grouping,
    GroupMember,
    PersonalizedAdapter,
    Round,
    SimilarityEdge,
    Update,
    UpdateStatus,
)
from services import metrics  # noqa: F401 - fedvec_build_info of this process too
from services.db import as_utc, session_scope
from services.settings import Settings


def read_state(s: Session) -> dict[str, Any]:
    """Everything one scrape reports from the database, in a few aggregate queries."""
    latest = s.scalars(select(Grouping).order_by(Grouping.version.desc()).limit(1)).first()
    active = Client.removed_at.is_(None)  # a removed client's series go away
    sizes: list[Any] = []  # rows (group index, members)
    client_group: list[Any] = []  # rows (client name, group index)
    if latest is not None:
        sizes = list(
            s.execute(
                select(GroupMember.group_index, func.count())
                .where(GroupMember.version == latest.version)
                .group_by(GroupMember.group_index)
            ).all()
        )
        client_group = list(
            s.execute(
                select(Client.name, GroupMember.group_index)
                .join(GroupMember, GroupMember.client_id == Client.id)
                .where(GroupMember.version == latest.version, active)
            ).all()
        )
    # the client's latest update row, else its enrollment
    last_update = list(
        s.execute(
            select(Client.name, func.coalesce(func.max(Update.created_at), Client.enrolled_at))
            .outerjoin(Update, Update.client_id == Client.id)
            .where(active)
            .group_by(Client.id, Client.name, Client.enrolled_at)
        ).all()
    )
    versions = list(
        s.execute(
            select(Client.name, func.coalesce(func.max(PersonalizedAdapter.version), 0))
            .outerjoin(PersonalizedAdapter, PersonalizedAdapter.client_id == Client.id)
            .where(active)
            .group_by(Client.id, Client.name)
        ).all()
    )
    # a failed evaluation (no score, its reason recorded) does not hide the last score
    newest_eval = (
        select(func.max(Evaluation.id))
        .where(Evaluation.accuracy.is_not(None))
        .group_by(Evaluation.client_id)
    )
    scores = list(
        s.execute(
            select(Client.name, Evaluation.metric, Evaluation.accuracy)
            .join(Evaluation, Evaluation.client_id == Client.id)
            .where(Evaluation.id.in_(newest_eval), active)
        ).all()
    )
    return {
        "sites": sorted(set(s.scalars(select(Client.site).distinct()))),
        "clients": s.scalar(select(func.count()).select_from(Client).where(active)) or 0,
        "by_status": dict(
            s.execute(select(Update.status, func.count()).group_by(Update.status)).all()
        ),
        "adapters": s.scalar(select(func.count()).select_from(PersonalizedAdapter)) or 0,
        "grouping_version": latest.version if latest else 0,
        "sizes": sizes,
        "similarity_entries": s.scalar(select(func.count()).select_from(SimilarityEdge)) or 0,
        "last_round": s.scalar(select(func.max(Round.id))) or 0,
        "last_update": last_update,
        "versions": versions,
        "scores": scores,
        "client_group": client_group,
    }


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class DatabaseCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        from services.celery_app import make_app

        self.settings = settings
        self.app = make_app(settings)  # once: a scrape only opens a broker connection

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from services.celery_app import queue_depths, queues_for_sites

        try:
            with session_scope(self.settings.resolved_database_url) as s:
                if s.get_bind().dialect.name == "postgresql":
                    # A locked table must not pile up blocked scrapes: after a few seconds
                    # this scrape reports the database as down and lets go.
                    s.execute(text("SET LOCAL statement_timeout = '5s'"))
                st = read_state(s)
        except Exception:  # noqa: BLE001 - a scrape reports the outage, it does not crash
            yield _gauge("fedvec_database_up", "1 if the database answered this scrape", 0)
            return
        yield _gauge("fedvec_database_up", "1 if the database answered this scrape", 1)
        yield _gauge("fedvec_clients", "Enrolled clients", st["clients"])
        g = GaugeMetricFamily("fedvec_updates", "Updates by status", labels=["status"])
        for status in UpdateStatus:
            g.add_metric([status], st["by_status"].get(status, 0))
        yield g
        yield _gauge(
            "fedvec_personalized_adapters", "Personalized adapters published", st["adapters"]
        )
        yield _gauge("fedvec_groups", "Groups in the latest grouping", len(st["sizes"]))
        yield _gauge(
            "fedvec_grouping_version", "Version of the latest grouping", st["grouping_version"]
        )
        g = GaugeMetricFamily(
            "fedvec_group_members", "Clients in each group of the latest grouping", labels=["group"]
        )
        for group, n in sorted(st["sizes"]):
            g.add_metric([str(group)], n)
        yield g
        yield _gauge(
            "fedvec_similarity_index_size",
            "Entries (client, peer) in the similarity index",
            st["similarity_entries"],
        )
        yield _gauge(
            "fedvec_last_round", "Highest synchronous round id (0: none)", st["last_round"]
        )

        now = datetime.now(UTC)
        g = GaugeMetricFamily(
            "fedvec_client_last_update_age_seconds",
            "Seconds since the client's latest update (none yet: since its enrollment)",
            labels=["client"],
        )
        for name, stamp in st["last_update"]:
            g.add_metric([name], max(0.0, (now - as_utc(stamp)).total_seconds()))
        yield g
        g = GaugeMetricFamily(
            "fedvec_client_personalized_version",
            "Version of the client's latest personalized adapter (0: the initial one)",
            labels=["client"],
        )
        for name, version in st["versions"]:
            g.add_metric([name], version)
        yield g
        g = GaugeMetricFamily(
            "fedvec_client_accuracy",
            "Score of the client's latest evaluation (metric: accuracy or rouge_l)",
            labels=["client", "metric"],
        )
        for name, metric, score in st["scores"]:
            g.add_metric([name, metric], score)
        yield g
        g = GaugeMetricFamily(
            "fedvec_client_group", "The client's group in the latest grouping", labels=["client"]
        )
        for name, group in st["client_group"]:
            g.add_metric([name], group)
        yield g

        depths = queue_depths(self.app, queues_for_sites(st["sites"]))
        g = GaugeMetricFamily("fedvec_queue_depth", "Messages waiting per queue", labels=["queue"])
        for q, depth in depths.items():
            if depth is not None:
                g.add_metric([q], depth)
        yield g


def run_exporter(settings: Settings, port: int) -> None:
    """Serve until interrupted."""
    REGISTRY.register(DatabaseCollector(settings))
    start_http_server(port)
    while True:
        time.sleep(3600)
