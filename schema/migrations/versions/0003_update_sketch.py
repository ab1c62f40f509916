"""count sketch of each update's task vector (the scalable similarity index)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 02:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: updates stored before this revision have none; the aggregator sketches
    # their task vectors itself when it needs them
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("sketch", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("sketch")
