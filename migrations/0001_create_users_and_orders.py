"""Create users and orders (orders sharded by user_id, next to their user)."""

import sqlalchemy as sa


def upgrade(op):
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
    )
    op.create_table(
        "orders",
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("item", sa.String(64), nullable=False),
    )


def downgrade(op):
    op.drop_table("orders")
    op.drop_table("users")
