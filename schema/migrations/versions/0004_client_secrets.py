"""client signing keys and update signatures

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 02:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: clients enrolled before this revision have no secret, and their updates
    # are accepted unsigned
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("secret_hash", sa.String(length=64), nullable=True))
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("signature", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("signature")
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("secret_hash")
