"""The per-process handles every component needs, built from settings once."""

from __future__ import annotations

from functools import cache

from services.object_store import ObjectStore, open_object_store
from services.settings import Settings


@cache
def object_store(settings: Settings) -> ObjectStore:
    return open_object_store(
        settings.resolved_object_store_url,
        s3_endpoint=settings.s3_endpoint or None,
        s3_access_key=settings.s3_access_key or None,
        s3_secret_key=settings.s3_secret_key or None,
        s3_secure=settings.s3_secure,
        s3_region=settings.s3_region or None,
    )
