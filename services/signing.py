"""Client keys and update signatures: a worker can only submit updates for the clients
whose private keys its site holds, and the server holds no key that signs.

`fedvec enroll` draws an Ed25519 key pair per client: the private key goes into the site's
keys file (FEDVEC_CLIENT_SECRETS_FILE, 0600) and is shown once; the database keeps only the
public key. A worker signs each report (schema/events.Report: an update's every field,
the sha256 of its stored files among them; an evaluation's scores) and the aggregator
verifies it with the public key before it writes anything (the signature binds the files
too, because the aggregator checks their sha256 when it reads them). Reading the whole
database therefore lets nobody sign. `fedvec rotate-key` issues a new pair.

Transition from HMAC (clients enrolled before Ed25519): their site file holds a shared
secret and the database its hash, which is also the HMAC key, so whoever reads the
`clients` table can sign as them. They keep working until `fedvec rotate-key` moves them
to a key pair, or until FEDVEC_ACCEPT_HMAC=false refuses their updates; a later release
drops HMAC (and the `secret_hash` column) altogether.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat
from cryptography.hazmat.primitives.serialization import NoEncryption as _NoEncryption

ED25519_PREFIX = "ed25519:"  # a site file entry that is a private key, not an HMAC secret
_KEY_CONTEXT = b"fedvec client signing key\x00"


class SigningError(Exception):
    """A key is missing or a keys file is unreadable (the message says which)."""


# --- Ed25519 ---------------------------------------------------------------------------
def new_private_key() -> str:
    """A new client private key, as the site file holds it: 'ed25519:' + base64 of 32 bytes."""
    raw = Ed25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, _NoEncryption()
    )
    return ED25519_PREFIX + base64.b64encode(raw).decode()


def _private(key: str) -> Ed25519PrivateKey:
    try:
        raw = base64.b64decode(key.removeprefix(ED25519_PREFIX), validate=True)
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, binascii.Error) as exc:
        raise SigningError(f"not an Ed25519 private key: {exc}") from None


def public_key(private_key: str) -> str:
    """The public key the database keeps (hex of 32 bytes)."""
    return _private(private_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign(private_key: str, message: bytes) -> str:
    """A report's signature (hex of 64 bytes) with the client's private key."""
    return _private(private_key).sign(message).hex()


def verify(public: str, signature: str | None, message: bytes) -> bool:
    if not signature:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        key.verify(bytes.fromhex(signature), message)
    except (ValueError, InvalidSignature):
        return False
    return True


# --- HMAC, for clients enrolled before Ed25519 (see the module docstring) --------------
def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def hmac_key(secret: str) -> str:
    """What the database keeps for an HMAC client (hex): a hash of its secret, and the key."""
    return hashlib.sha256(_KEY_CONTEXT + secret.encode()).hexdigest()


def hmac_sign(key: str, message: bytes) -> str:
    return hmac.new(bytes.fromhex(key), message, hashlib.sha256).hexdigest()


def hmac_verify(key: str, signature: str | None, message: bytes) -> bool:
    if not signature:
        return False
    return hmac.compare_digest(hmac_sign(key, message), signature)


def sign_report(site_key: str, message: bytes) -> str:
    """Sign with what the site file holds for the client: a private key, or (until the client
    is rotated) its HMAC secret."""
    if site_key.startswith(ED25519_PREFIX):
        return sign(site_key, message)
    return hmac_sign(hmac_key(site_key), message)


# --- the site's keys file: {"<client id>": "<private key or legacy secret>"} -----------
# A key a site made itself for a client the admin has not enrolled yet (`fedvec site-enroll`)
# is filed under "name:<client name>": the site never learns the id before the admin
# records the public key, and the worker finds the key by name until then.
def pending_entry(name: str) -> str:
    return f"name:{name}"


def read_secrets(path: Path) -> dict[str, str]:
    """The keys of a site's clients ({} when the file does not exist)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SigningError(f"cannot read the client keys file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SigningError(f"client keys file {path} must map client ids to keys")
    return data


def add_secret(path: Path, client_id: int | str, secret: str) -> None:
    """Add (or replace) a client's key in the file (by id, or a pending_entry), written
    atomically and readable by its owner only (0600)."""
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


def find_secret(path: Path, client_id: int, name: str = "") -> str | None:
    """The client's key by id, else the key its site made before enrollment (by name)."""
    data = read_secrets(path)
    found = data.get(str(client_id))
    return found if found is not None or not name else data.get(pending_entry(name))


def secret_for(path: Path, client_id: int, name: str = "") -> str:
    secret = find_secret(path, client_id, name)
    if secret is None:
        raise SigningError(
            f"this worker holds no key for client {client_id} (FEDVEC_CLIENT_SECRETS_FILE="
            f"{path}): only the site that enrolled the client can train it"
        )
    return secret
