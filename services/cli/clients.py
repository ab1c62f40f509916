"""Clients: enroll one, list them."""

from __future__ import annotations

import click

from services import operations as ops
from services.cli.common import (
    check_db,
    echo_json,
    settings_of,
)
from services.console import table


@click.command()
@click.argument("name")
@click.option(
    "--data", "data", required=True, type=click.Path(), help="training data (.jsonl/.json)"
)
@click.option("--test", "test", type=click.Path(), help="test split, for `fedvec evaluate`")
@click.option("--task", default="", help="task label shown in tables (default: data folder name)")
@click.option(
    "--site", default="default", show_default=True, help="site whose workers hold the data"
)
@click.option("--json", "as_json", is_flag=True, help="print the client as JSON")
@click.pass_context
def enroll(
    ctx: click.Context, name: str, data: str, test: str | None, task: str, site: str, as_json: bool
) -> None:
    """Enroll client NAME with its training data file.

    Records: {"prompt": ..., "options": [...], "answer": ...} (JSON lines or a JSON list),
    or FLAN records with an OPTIONS: list. The file is checked before anything is
    written; the data stays where it is (workers of SITE read it).

    The client gets a secret, printed once and added to FEDVEC_CLIENT_SECRETS_FILE: a
    worker signs the client's updates with it, and the aggregator refuses updates that
    are not signed by the client's secret (the database keeps only a hash of it)."""
    settings = settings_of(ctx)
    check_db(settings)
    row = ops.enroll(settings, name, data, test=test, task=task, site=site)
    if as_json:
        echo_json(row)
    else:
        click.echo(f"enrolled {row['name']} (id {row['id']}, {row['num_examples']} examples)")
        # the only time the secret is shown: the database keeps a hash of it
        click.echo(f"secret (shown once): {row['secret']}")
        click.echo(
            f"added to {row['secrets_file']}; the workers of site {row['site']!r} need it "
            "in their FEDVEC_CLIENT_SECRETS_FILE to train this client"
        )
        if row["policy_file"]:
            click.echo(
                f"object-store policy (its own prefix only): {row['policy_file']}; apply it "
                "with MinIO's `mc admin policy` (README: Reliability and security)"
            )


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def clients(ctx: click.Context, as_json: bool) -> None:
    """List enrolled clients."""
    settings = settings_of(ctx)
    check_db(settings)
    rows = ops.list_clients(settings)
    if as_json:
        echo_json(rows)
        return
    click.echo(
        table(
            [
                [
                    r["id"],
                    r["name"],
                    r["task"],
                    r["site"],
                    r["num_examples"],
                    r["num_test_examples"],
                ]
                for r in rows
            ],
            ["id", "name", "task", "site", "train", "test"],
        )
    )
