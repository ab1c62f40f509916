"""`fedvec`: the admin CLI, a root group and a module per group of commands. Every command
reads settings from FEDVEC_* variables or `.env` (see README); `--json` prints
machine-readable output for scripts. Commands are thin: the work is in the service modules."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from services import operations as ops
from services.cli import bench, clients, data, observe, run
from services.cli.common import UNREACHABLE_EXIT, unreachable
from services.settings import load_settings


class FedvecGroup(click.Group):
    """Turns expected refusals into one readable line and exit code 2, and an unreachable
    database, broker or object store into one line and exit code 3 (--debug: the
    traceback instead)."""

    def invoke(self, ctx: click.Context) -> Any:
        from services.db import SchemaNotReady

        try:
            return super().invoke(ctx)
        except (ops.OperationError, SchemaNotReady, ValueError, FileNotFoundError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            obj = ctx.obj or {}
            line = None if obj.get("debug") else unreachable(exc, obj.get("settings"))
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(UNREACHABLE_EXIT)


@click.group(cls=FedvecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default: FEDVEC_LOG_LEVEL)")
@click.option("--debug", is_flag=True, help="show the traceback of an unreachable service")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, debug: bool) -> None:
    """fedvec: personalized federated fine-tuning by task-vector aggregation.

    Clients fine-tune a LoRA adapter of a shared model on their private data; the
    aggregator compares clients by their task vectors and gives each client its own
    aggregate of the clients that resemble it.

    Typical session: `fedvec db upgrade`, `fedvec enroll NAME --data train.jsonl
    --test test.jsonl`, start `fedvec worker` and `fedvec aggregator`, then
    `fedvec train --all --rounds 3`, `fedvec status`, `fedvec export NAME DIR`.
    Or just `fedvec demo`.
    """
    settings = load_settings()
    logging.basicConfig(
        level=(log_level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # one line per command is enough from these libraries
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retries
    ctx.obj = {"settings": settings, "debug": debug}


for command in (
    clients.enroll,
    clients.site_enroll,
    clients.enroll_flan,
    clients.clients,
    clients.rotate_key,
    clients.remove,
    clients.versions,
    clients.rollback,
    clients.site_credentials,
    run.train,
    run.worker,
    run.aggregator,
    run.metrics,
    run.demo,
    observe.evaluate,
    observe.status,
    observe.groups,
    data.db,
    data.export,
    data.gc,
    bench.bench,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="fedvec")
