"""evaluation metric: accuracy (multiple choice) or rouge_l (generation)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 19:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(
            sa.Column("metric", sa.String(length=16), nullable=False, server_default="accuracy")
        )


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("metric")
