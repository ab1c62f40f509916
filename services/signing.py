"""Client secrets and update signatures: a worker can only submit updates for the clients
whose secrets its site holds.

`fedvec enroll` draws a secret per client, shows it once and adds it to the site's secrets
file; the database keeps only `signing_key(secret)`, a one-way hash of it. A worker signs
each update with HMAC-SHA256 under that key, over the client id, the update id and the
sha256 of both stored files; the aggregator recomputes the HMAC from the key in the
database before it uses the update. The signature binds the files too, because the
aggregator checks their sha256 against the row.

HMAC needs the same key on both sides, so whoever can read the `clients` table can sign as
any client (the secret itself cannot be recovered from it): guard the database as you
guard the secrets files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

_KEY_CONTEXT = b"fedvec client signing key\x00"


class SigningError(Exception):
    """A secret is missing or a secrets file is unreadable (the message says which)."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def signing_key(secret: str) -> str:
    """The key the database keeps for a client (hex): a hash of its secret."""
    return hashlib.sha256(_KEY_CONTEXT + secret.encode()).hexdigest()


def _message(
    client_id: int, update_uid: str, adapter_sha256: str, task_vector_sha256: str
) -> bytes:
    fields = ("fedvec-update-v1", str(client_id), update_uid, adapter_sha256, task_vector_sha256)
    return "\n".join(fields).encode()


def sign(
    key: str, client_id: int, update_uid: str, adapter_sha256: str, task_vector_sha256: str
) -> str:
    msg = _message(client_id, update_uid, adapter_sha256, task_vector_sha256)
    return hmac.new(bytes.fromhex(key), msg, hashlib.sha256).hexdigest()


def verify(
    key: str,
    signature: str | None,
    client_id: int,
    update_uid: str,
    adapter_sha256: str,
    task_vector_sha256: str,
) -> bool:
    if not signature:
        return False
    expected = sign(key, client_id, update_uid, adapter_sha256, task_vector_sha256)
    return hmac.compare_digest(expected, signature)


# --- the site's secrets file: {"<client id>": "<secret>"} ---------------------------------
def read_secrets(path: Path) -> dict[str, str]:
    """The secrets of a site's clients ({} when the file does not exist)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SigningError(f"cannot read the client secrets file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SigningError(f"client secrets file {path} must map client ids to secrets")
    return data


def add_secret(path: Path, client_id: int, secret: str) -> None:
    """Add a client's secret to the file, written atomically and readable by its owner
    only (0600)."""
    data = read_secrets(path)
    data[str(client_id)] = secret
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def secret_for(path: Path, client_id: int) -> str:
    secret = read_secrets(path).get(str(client_id))
    if secret is None:
        raise SigningError(
            f"this worker holds no secret for client {client_id} (FEDVEC_CLIENT_SECRETS_FILE="
            f"{path}): only the site that enrolled the client can train it"
        )
    return secret
