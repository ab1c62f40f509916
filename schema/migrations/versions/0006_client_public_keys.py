"""client public keys (Ed25519): the database keeps no key that signs

Existing clients keep their HMAC `secret_hash` until `fedvec rotate-key` gives them a key
pair (services/signing.py); signatures grow to 128 hex characters (64 bytes).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("public_key", sa.String(length=64), nullable=True))
    with op.batch_alter_table("updates") as batch:
        batch.alter_column(
            "signature", existing_type=sa.String(length=64), type_=sa.String(length=128)
        )


def downgrade() -> None:
    # Ed25519 signatures do not fit the old column: drop them with the keys
    op.execute("UPDATE updates SET signature = NULL WHERE length(signature) > 64")
    with op.batch_alter_table("updates") as batch:
        batch.alter_column(
            "signature", existing_type=sa.String(length=128), type_=sa.String(length=64)
        )
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("public_key")
