"""`fedvec metrics`: gauges read from the database and the broker at scrape time, for
what no single worker or aggregator process knows (enrolled clients, updates by status,
groups, queue depths). One such exporter per deployment."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from schema.models import Client, Grouping, GroupMember, PersonalizedAdapter, Update
from services.db import session_scope
from services.settings import Settings


class DatabaseCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import make_app

        self.settings = settings
        self.app = make_app(settings)  # once: a scrape only opens a broker connection

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from workers.celery_app import queue_depths, queues_for_sites

        up = GaugeMetricFamily("fedvec_database_up", "1 if the database answered this scrape")
        try:
            with session_scope(self.settings.resolved_database_url) as s:
                sites = sorted(set(s.scalars(select(Client.site))))
                clients = s.scalar(select(func.count()).select_from(Client))
                by_status = dict(
                    s.execute(select(Update.status, func.count()).group_by(Update.status)).all()
                )
                adapters = s.scalar(select(func.count()).select_from(PersonalizedAdapter))
                latest = s.scalars(select(Grouping).order_by(Grouping.version.desc())).first()
                sizes = (
                    list(
                        s.execute(
                            select(GroupMember.group_index, func.count())
                            .where(GroupMember.version == latest.version)
                            .group_by(GroupMember.group_index)
                        ).all()
                    )
                    if latest
                    else []
                )
        except Exception:  # noqa: BLE001 - a scrape reports the outage, it does not crash
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        g = GaugeMetricFamily("fedvec_clients", "Enrolled clients")
        g.add_metric([], clients)
        yield g
        g = GaugeMetricFamily("fedvec_updates", "Updates by status", labels=["status"])
        for status in ("stored", "aggregated", "rejected", "failed"):
            g.add_metric([status], by_status.get(status, 0))
        yield g
        g = GaugeMetricFamily("fedvec_personalized_adapters", "Personalized adapters published")
        g.add_metric([], adapters or 0)
        yield g
        g = GaugeMetricFamily("fedvec_groups", "Groups in the latest grouping")
        g.add_metric([], len(sizes))
        yield g
        g = GaugeMetricFamily("fedvec_grouping_version", "Version of the latest grouping")
        g.add_metric([], latest.version if latest else 0)
        yield g
        depths = queue_depths(self.app, queues_for_sites(sites))
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
