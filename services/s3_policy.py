"""Per-client object-store policies for MinIO (or any S3 with IAM-style policies).

A site's workers need to read the shared objects (`global/`: the initial adapter and its
config) and to read and write their own clients' objects (`clients/<id>/`: updates and
personalized adapters), and nothing else. `fedvec enroll` writes such a policy per client
when the object store is on S3; an operator applies it with MinIO's admin tool (README,
"Reliability and security"). The aggregator and the admin CLI keep full access.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket[/prefix]; the prefix ends with '/' unless empty."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    prefix = urllib.parse.unquote(parsed.path).strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def client_policy(bucket: str, prefix: str, client_ids: list[int]) -> dict[str, Any]:
    """Read/write the clients' own objects, read the shared ones, list only those."""
    own = [f"{prefix}clients/{cid}/" for cid in client_ids]
    shared = f"{prefix}global/"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": OBJECT_ACTIONS,
                "Resource": [f"arn:aws:s3:::{bucket}/{p}*" for p in own],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{shared}*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in [*own, shared]]}},
            },
            {
                # the store checks that its bucket exists when it opens
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
        ],
    }


def write_client_policy(folder: Path, object_store_url: str, client_id: int) -> Path:
    """policies/client-<id>.json for an S3 store; returns its path."""
    bucket, prefix = parse_s3_url(object_store_url)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"client-{client_id}.json"
    path.write_text(json.dumps(client_policy(bucket, prefix, [client_id]), indent=2) + "\n")
    return path
