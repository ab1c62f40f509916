"""Per-site Redis users: a site's workers reach their own queue and nothing else of the
broker, so sites in different companies cannot read, steal or forge each other's work.

What a site's worker does on Redis (kombu's Redis transport, with the site's Celery options
from services/celery_app.py), and so what its user may touch:
- its queue `train.SITE`: BRPOP (take a task), LPUSH/RPUSH (give an unfinished one back),
  and the priority lists `train.SITE\\x06\\x16<n>` kombu keeps beside it;
- the binding sets `_kombu.binding.train.SITE` and `_kombu.binding_permanent.train.SITE`,
  which its worker writes when it declares the queue;
- its in-flight messages, `unacked.train.SITE` (hash), `.index` (sorted set) and `.mutex`
  (celery_app puts a site's acks-late bookkeeping under its own keys; kombu's default is
  one `unacked` hash shared by every consumer, which would hold every site's messages);
- the `aggregate` queue, write only (%W): it pushes its update events there, and cannot
  read, pop or count the other sites' events, nor the aggregator's bindings.
Nothing else: no other key, no pub/sub channel (site workers run without remote control,
whose broadcasts every worker hears), no KEYS/SCAN, no admin command.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from services.celery_app import AGGREGATE_QUEUE, SHARED_SITES, train_queue

SEP = "\x06\x16"  # kombu's separator in priority queue names and binding members
# what kombu's Redis transport sends for a consumer and a producer, beyond @connection
COMMANDS = (
    "select", "brpop", "rpop", "lpush", "rpush", "llen", "exists", "type",
    "sadd", "smembers", "srem",
    "hset", "hget", "hdel", "hgetall", "hlen", "hmget", "hexists",
    "zadd", "zrem", "zrange", "zrangebyscore", "zrevrange", "zrevrangebyscore", "zcard", "zscore",
    "set", "get", "del", "expire", "pexpire", "ttl", "pttl",
    "multi", "exec", "discard", "watch", "unwatch", "eval", "evalsha", "script|load",
)  # fmt: skip


def site_user(site: str) -> str:
    return f"fedvec-site-{site}"


def site_rules(site: str) -> list[str]:
    """The ACL SETUSER rules (without the password) of SITE's broker user."""
    if site in SHARED_SITES:
        raise ValueError("the shared pool has no site of its own: name a site")
    queue = train_queue(site)
    keys = [
        f"~{queue}",
        f"~{queue}{SEP}*",
        f"~_kombu.binding.{queue}",
        f"~_kombu.binding_permanent.{queue}",
        f"~unacked.{queue}",
        f"~unacked.{queue}.index",
        f"~unacked.{queue}.mutex",
        f"%W~{AGGREGATE_QUEUE}",
        f"%W~{AGGREGATE_QUEUE}{SEP}*",
    ]
    # @connection minus its dangerous part (CLIENT LIST and KILL would show or drop the
    # other sites' connections)
    commands = ["-@all", "+@connection", "-@dangerous", *(f"+{c}" for c in COMMANDS)]
    return ["reset", "on", "resetchannels", *commands, *keys]


@dataclass(frozen=True)
class SiteCredentials:
    site: str
    user: str
    password: str
    broker_url: str  # what the site sets as FEDVEC_BROKER_URL

    def acl_setuser(self) -> list[str]:
        """The command, as arguments, that creates or replaces the user on Redis."""
        return ["ACL", "SETUSER", self.user, *site_rules(self.site), f">{self.password}"]


def site_credentials(site: str, broker_url: str, password: str | None = None) -> SiteCredentials:
    """A new password for SITE's user, and the broker URL its workers connect with (the
    admin URL's host, port and database, the site's user)."""
    parts = urlsplit(broker_url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"per-site broker users need a Redis broker, not {parts.scheme}://")
    user, password = site_user(site), password or secrets.token_urlsafe(24)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password, safe='')}@{host}" + (
        f":{parts.port}" if parts.port else ""
    )
    url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return SiteCredentials(site, user, password, url)


def redis_cli_command(args: list[str]) -> str:
    """The arguments as redis-cli reads them (at its prompt, or piped into it): kombu's
    control characters as \\xHH inside double quotes, which redis-cli decodes."""

    def char(c: str) -> str:
        return c if " " <= c < "\x7f" and c not in '"\\|' else f"\\x{ord(c):02x}"

    def arg(a: str) -> str:
        plain = all(" " < c < "\x7f" and c not in "\"'\\" for c in a)
        return a if plain else '"' + "".join(char(c) for c in a) + '"'

    return " ".join(arg(a) for a in args)


def apply(broker_url: str, credentials: SiteCredentials) -> None:
    """Create or replace the site's user on the broker (with the admin URL's rights). Redis
    keeps ACL users in memory: `ACL SAVE` (with an aclfile configured) makes them last."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5)
    try:
        client.execute_command(*credentials.acl_setuser())
    finally:
        client.close()
