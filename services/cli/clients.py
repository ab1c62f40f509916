"""Clients: enroll one (here, or from a site's request), list them, rotate a key, remove one,
list and roll back its personalized versions."""

from __future__ import annotations

import json

import click

from services import operations as ops
from services.cli.common import (
    check_db,
    echo_json,
    settings_of,
)
from services.console import table

DATA_HELP = "training data (.jsonl/.json)"
TEST_HELP = "test split, for `fedvec evaluate`"
TASK_HELP = "task label shown in tables (default: data folder name)"
SITE_HELP = "site whose workers hold the data"


@click.command()
@click.argument("name")
@click.option("--data", "data", type=click.Path(), help=DATA_HELP)
@click.option("--test", "test", type=click.Path(), help=TEST_HELP)
@click.option("--task", default="", help=TASK_HELP)
@click.option("--site", default="default", show_default=True, help=SITE_HELP)
@click.option(
    "--request",
    "request",
    type=click.Path(),
    help="a site's enrollment request (`fedvec site-enroll`) instead of --data",
)
@click.option("--json", "as_json", is_flag=True, help="print the client as JSON")
@click.pass_context
def enroll(
    ctx: click.Context,
    name: str,
    data: str | None,
    test: str | None,
    task: str,
    site: str,
    request: str | None,
    as_json: bool,
) -> None:
    """Enroll client NAME with its training data file.

    Records: {"prompt": ..., "options": [...], "answer": ...} (JSON lines or a JSON list),
    or FLAN records with an OPTIONS: list. The file is checked before anything is
    written; the data stays where it is (workers of SITE read it).

    The client gets an Ed25519 key pair: the private key is printed once and added to
    FEDVEC_CLIENT_SECRETS_FILE, which the workers of SITE need to train this client (they
    sign its updates with it); the database keeps only the public key, which the
    aggregator verifies every update with.

    A site in another organisation keeps its data and its key to itself: it runs
    `fedvec site-enroll` (no server credentials needed) and sends the request file it
    writes; `fedvec enroll NAME --request FILE` records that client with the site's public
    key, without reading its data."""
    settings = settings_of(ctx)
    if (data is None) == (request is None):
        raise click.UsageError("give either --data (a file here) or --request (from a site)")
    if request is not None and (test or task or site != "default"):
        raise click.UsageError("--test, --task and --site come from the request")
    check_db(settings)
    if request is not None:
        if ops.read_request(request)["name"] != name:
            raise click.UsageError(f"the request {request} is not for {name!r}")
        row = ops.enroll_request(settings, request)
    else:
        row = ops.enroll(settings, name, data, test=test, task=task, site=site)
    if as_json:
        echo_json(row)
        return
    click.echo(f"enrolled {row['name']} (id {row['id']}, {row['num_examples']} examples)")
    if row["private_key"]:
        _echo_key(row)
    else:
        click.echo(
            f"its site {row['site']!r} holds its private key (filed under its name); the "
            "server keeps its public key"
        )
    if row["policy_file"]:
        click.echo(
            f"object-store policy (its own prefix only): {row['policy_file']}; apply it "
            "with MinIO's `mc admin policy` (README: Reliability and security)"
        )


@click.command("site-enroll")
@click.argument("name")
@click.option("--data", "data", required=True, type=click.Path(), help=DATA_HELP)
@click.option("--test", "test", type=click.Path(), help=TEST_HELP)
@click.option("--task", default="", help=TASK_HELP)
@click.option("--site", required=True, help="this site's name (its workers' --site)")
@click.option(
    "--out",
    "out",
    type=click.Path(),
    help="write the request here (default: <name>.enroll.json)",
)
@click.option("--json", "as_json", is_flag=True, help="print the request as JSON")
@click.pass_context
def site_enroll(
    ctx: click.Context,
    name: str,
    data: str,
    test: str | None,
    task: str,
    site: str,
    out: str | None,
    as_json: bool,
) -> None:
    """At a site: prepare client NAME's enrollment without any server credentials.

    Checks the data files as `fedvec enroll` does, makes the client's Ed25519 key pair,
    adds the private key to this site's FEDVEC_CLIENT_SECRETS_FILE and writes a request
    file: the client's name, task, site, data paths, record counts and public key (never
    the data, never the private key). Send it to the admin, who runs
    `fedvec enroll NAME --request FILE`; this site's workers then train the client."""
    from pathlib import Path

    settings = settings_of(ctx)
    request = ops.site_enroll(settings, name, data, test=test, task=task, site=site)
    path = Path(out or f"{name}.enroll.json")
    try:
        path.write_text(json.dumps(request, indent=2) + "\n")
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc}") from None
    if as_json:
        echo_json({**request, "request_file": str(path)})
        return
    click.echo(
        f"{name}: {request['num_examples']} training and {request['num_test_examples']} "
        f"test records checked; private key added to {settings.client_secrets_path}"
    )
    click.echo(f"request written to {path}: send it to the admin, who runs")
    click.echo(f"  fedvec enroll {name} --request {path.name}")


@click.command()
@click.option("--removed", is_flag=True, help="list removed clients too")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def clients(ctx: click.Context, removed: bool, as_json: bool) -> None:
    """List enrolled clients."""
    settings = settings_of(ctx)
    check_db(settings)
    rows = ops.list_clients(settings, removed=removed)
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
                    "removed" if r["removed_at"] else r["signing"],
                ]
                for r in rows
            ],
            ["id", "name", "task", "site", "train", "test", "signing"],
        )
    )


def _echo_key(row: dict) -> None:
    # the only time the private key is shown: the database keeps the public key
    click.echo(f"private key (shown once): {row['private_key']}")
    click.echo(
        f"added to {row['keys_file']}; the workers of site {row['site']!r} need it in "
        "their FEDVEC_CLIENT_SECRETS_FILE to train this client"
    )


@click.command("rotate-key")
@click.argument("client")
@click.option("--json", "as_json", is_flag=True, help="print the client and its new key as JSON")
@click.pass_context
def rotate_key(ctx: click.Context, client: str, as_json: bool) -> None:
    """Give CLIENT a new Ed25519 key pair (a client still on HMAC moves to one).

    The new private key replaces the client's entry in FEDVEC_CLIENT_SECRETS_FILE: deliver
    it to the client's site. From now on the aggregator verifies with the new public key
    only: updates signed with the old key (in flight, or from a site that leaked it) are
    refused."""
    settings = settings_of(ctx)
    check_db(settings)
    (c,) = ops.resolve_clients(settings, [client])
    row = ops.rotate_key(settings, c)
    if as_json:
        echo_json(row)
    else:
        click.echo(f"new key pair for {row['name']} (id {row['id']})")
        _echo_key(row)


@click.command("site-credentials")
@click.argument("site")
@click.option(
    "--apply/--print-only",
    default=True,
    show_default=True,
    help="create the user on the broker (FEDVEC_BROKER_URL, an admin URL), or only print it",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def site_credentials(ctx: click.Context, site: str, apply: bool, as_json: bool) -> None:
    """A Redis user for SITE's workers that reaches only that site's queue.

    It may take tasks from train.SITE (and give them back), keep its in-flight messages
    under its own keys, and push update events onto the aggregate queue without reading
    it; every other key, channel and admin command is refused (README: Threat model).
    Prints the broker URL, with a new password shown once, that the site's workers set
    as FEDVEC_BROKER_URL (with FEDVEC_SITE=SITE). Running it again replaces the password.
    Redis keeps ACL users in memory: run `ACL SAVE` on a broker with an aclfile."""
    from services import broker_acl

    settings = settings_of(ctx)
    try:
        creds = broker_acl.site_credentials(site, settings.resolved_broker_url)
    except ValueError as exc:
        raise ops.OperationError(str(exc)) from None
    if apply:
        broker_acl.apply(settings.resolved_broker_url, creds)
    command = broker_acl.redis_cli_command(creds.acl_setuser())
    if as_json:
        echo_json(
            {
                "site": site,
                "user": creds.user,
                "broker_url": creds.broker_url,
                "applied": apply,
                "acl_setuser": creds.acl_setuser(),
            }
        )
        return
    click.echo(f"{'created' if apply else 'not applied:'} broker user {creds.user}")
    if not apply:
        click.echo(f"at the broker's redis-cli prompt (or piped into redis-cli): {command}")
    click.echo(f"site {site}: FEDVEC_SITE={site} FEDVEC_BROKER_URL={creds.broker_url}")
    click.echo("(the password is shown once)")


@click.command()
@click.argument("client")
@click.option(
    "--delete-objects",
    is_flag=True,
    help="also delete its objects (updates, personalized adapters) from the object store",
)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="print what was done as JSON")
@click.pass_context
def remove(ctx: click.Context, client: str, delete_objects: bool, yes: bool, as_json: bool) -> None:
    """Remove CLIENT: it trains no more and leaves every aggregate.

    In one database transaction: its keys are cleared (its reports are refused from then
    on), its train requests in flight are recorded failed (their rounds complete without
    it), its updates are withdrawn from every other client's aggregate (status
    `withdrawn`) and its similarity edges are dropped; it leaves its group at the next
    regrouping. Its row and history stay (`fedvec clients --removed`); its name stays
    taken. Its objects stay too, unless --delete-objects: they are deleted after the
    commit, and running the command again finishes an interrupted deletion.

    Revoke the rest by hand: its site's copy of the private key, and with MinIO its
    object-store policy (`mc admin policy detach`)."""
    settings = settings_of(ctx)
    check_db(settings)
    (c,) = ops.resolve_clients(settings, [client], removed_ok=True)
    if not yes and not as_json:
        what = "and delete its objects" if delete_objects else "(its objects are kept)"
        click.confirm(f"remove client {c.name} (id {c.id}) {what}?", abort=True)
    row = ops.remove_client(settings, c, delete_objects)
    if as_json:
        echo_json(row)
        return
    if row["already_removed"]:
        click.echo(f"{row['name']} was already removed")
    else:
        click.echo(
            f"removed {row['name']} (id {row['id']}): {row['requests_failed']} request(s) in "
            f"flight failed, {row['updates_withdrawn']} update(s) withdrawn"
        )
    if row["objects_deleted"] is not None:
        click.echo(f"deleted {row['objects_deleted']} object(s) under clients/{row['id']}/")


@click.command()
@click.argument("client")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def versions(ctx: click.Context, client: str, as_json: bool) -> None:
    """CLIENT's personalized adapter versions (what `fedvec rollback` can return to)."""
    settings = settings_of(ctx)
    check_db(settings)
    (c,) = ops.resolve_clients(settings, [client], removed_ok=True)
    rows = ops.versions(settings, c)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"{c.name} has no personalized adapter yet (version 0: the initial one)")
        return
    click.echo(
        table(
            [
                [
                    r["version"],
                    r["created_at"][:19],
                    r["strategy"],
                    f"copy of {r['rollback_to']}" if r["rollback_to"] is not None else r["updates"],
                    r["sha256"][:12],
                ]
                for r in rows
            ],
            ["version", "created", "strategy", "updates", "sha256"],
        )
    )


@click.command()
@click.argument("client")
@click.option("--to", "to_version", type=click.IntRange(min=0), required=True, help="version")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollback(ctx: click.Context, client: str, to_version: int, as_json: bool) -> None:
    """Roll CLIENT back to an earlier personalized version (see `fedvec versions`).

    The earlier adapter is checked (read, sha256) and published again as the newest
    version, so history only grows; the client's next training starts from it. Use it
    when a personalized adapter is bad or corrupt (every training of the client then
    fails). Version 0 is the shared initial adapter."""
    settings = settings_of(ctx)
    check_db(settings)
    (c,) = ops.resolve_clients(settings, [client])
    row = ops.rollback(settings, c, to_version)
    if as_json:
        echo_json(row)
    else:
        click.echo(
            f"{row['client']} is at version {row['version']}, a copy of version {row['copy_of']}"
        )


@click.command("enroll-flan")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--site", default="default", show_default=True, help="site whose workers hold the data"
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="cut each task's records into this many clients",
)
@click.option(
    "--test-per-client",
    type=click.IntRange(min=1),
    default=None,
    help="test records per client (default: all of its task's)",
)
@click.option("--json", "as_json", is_flag=True, help="print the clients as JSON")
@click.pass_context
def enroll_flan(
    ctx: click.Context,
    data_dir: str,
    site: str,
    shards: int,
    test_per_client: int | None,
    as_json: bool,
) -> None:
    """Enroll every client of a FLAN-format folder DATA_DIR.

    The folder holds train_client_K.json (a JSON list of one task's FLAN records, any
    number of clients) and test.jsonl (every task's test records, each with its `task`).
    Each multiple-choice client is enrolled as flan-K-TASK with its records and its own
    task's test records, written under FEDVEC_HOME/data/; generation clients are left out
    (the encoder cannot score them), with a line saying so. Every file is checked first:
    on any error nothing is enrolled. The clients' private keys go to
    FEDVEC_CLIENT_SECRETS_FILE."""
    settings = settings_of(ctx)
    check_db(settings)
    out = ops.enroll_flan(
        settings, data_dir, site=site, shards=shards, test_per_client=test_per_client
    )
    if as_json:
        echo_json(out)
        return
    click.echo(
        table(
            [
                [r["id"], r["name"], r["task"], r["num_examples"], r["num_test_examples"]]
                for r in out["clients"]
            ],
            ["id", "name", "task", "train", "test"],
        )
    )
    for line in out["left_out"]:
        click.echo(f"left out: {line}")
    click.echo(
        f"enrolled {len(out['clients'])} clients from {out['data_dir']} (their files: "
        f"{out['written_to']}; their keys: {out['keys_file']}, for the workers of site {site!r})"
    )
