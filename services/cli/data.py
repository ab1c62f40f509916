"""Data: the database schema, exporting an adapter, collecting orphaned objects."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from services import operations as ops
from services.cli.common import (
    check_db,
    echo_json,
    settings_of,
)
from services.console import table


@click.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the database schema to REVISION."""
    from services.db import current_revision, redact_url, upgrade

    url = settings_of(ctx).resolved_database_url
    logging.getLogger("alembic").setLevel(logging.INFO)
    upgrade(url, revision)
    click.echo(f"database {redact_url(url)} at revision {current_revision(url)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Show the database's schema revision and the code's."""
    from services.db import current_revision, head_revision

    url = settings_of(ctx).resolved_database_url
    click.echo(f"database: {current_revision(url) or 'none'}  code: {head_revision()}")


@click.command()
@click.argument("client")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--version", type=int, default=None, help="adapter version (default: latest)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export(
    ctx: click.Context, client: str, out_dir: str, version: int | None, as_json: bool
) -> None:
    """Write CLIENT's personalized adapter as a PEFT folder (PeftModel.from_pretrained)."""
    settings = settings_of(ctx)
    check_db(settings)
    (c,) = ops.resolve_clients(settings, [client])
    info = ops.export_adapter(settings, c, Path(out_dir), version)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {info['client']} version {info['version']} to {info['path']}")


@click.command()
@click.option(
    "--older-than",
    "older_than",
    default="1h",
    show_default=True,
    metavar="AGE",
    help="grace period: only objects written longer ago than this (3600, 30m, 1h, 2d)",
)
@click.option("--delete", is_flag=True, help="delete the orphans (default: only list them)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def gc(ctx: click.Context, older_than: str, delete: bool, as_json: bool) -> None:
    """Find, and with --delete remove, orphaned objects in the object store.

    An orphan is an object under clients/ that no database row references: what a worker
    or aggregator killed between uploading and committing its row leaves behind. Global
    objects (the initial adapter, the adapter config) are never touched.

    Workers upload first and commit the row after, so an unreferenced object may belong to
    a task that is still running. The grace period (--older-than) keeps those: only objects
    written longer ago than AGE count as orphans. Keep it well above the longest upload.
    Each deletion checks the object and the database once more, and is logged with its key.

    Without --delete this is a dry run: it lists what would be deleted and changes nothing.
    """
    from services.gc import collect, format_bytes, format_duration, parse_duration
    from services.object_store import ObjectStoreError, TransientStoreError

    try:
        grace_s = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    settings = settings_of(ctx)
    check_db(settings)
    try:
        summary = collect(settings, grace_s, delete=delete)
    except TransientStoreError:
        raise  # unreachable: one line and exit 3, as for every command
    except ObjectStoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        echo_json(summary.as_dict())
    else:
        age = format_duration(grace_s)
        click.echo(
            f"scanned {summary.scanned} objects under clients/: {summary.referenced} referenced, "
            f"{summary.fresh} unreferenced but newer than {age} (kept: may be in flight), "
            f"{len(summary.orphans)} orphans ({format_bytes(summary.orphan_bytes)})"
        )
        if summary.orphans:
            rows = [
                [o.key, format_bytes(o.size), format_duration(o.age_s)] for o in summary.orphans
            ]
            click.echo(table(rows, ["orphan", "size", "age"]))
        if not delete:
            if summary.orphans:
                click.echo(
                    f"dry run: nothing deleted. To delete these {len(summary.orphans)} "
                    f"orphans, run: fedvec gc --older-than {older_than.strip()} --delete"
                )
            else:
                click.echo("dry run: nothing to delete")
        else:
            result = summary.result
            click.echo(
                f"deleted {len(result.deleted)} orphans ({format_bytes(summary.deleted_bytes)})"
            )
            for key, why in result.kept:
                click.echo(f"kept {key}: {why}")
            for key, err in result.failed:
                click.echo(f"failed {key}: {err}", err=True)
    if summary.result.failed:
        sys.exit(1)
