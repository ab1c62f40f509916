"""evaluations record a failure: reason, and no score

Workers report through the broker and the aggregator writes the row, so an evaluation that
failed is a row too (`fedvec evaluate` returns as soon as it sees it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.alter_column("accuracy", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM evaluations WHERE accuracy IS NULL")
    with op.batch_alter_table("evaluations") as batch:
        batch.alter_column("accuracy", existing_type=sa.Float(), nullable=False)
        batch.drop_column("reason")
