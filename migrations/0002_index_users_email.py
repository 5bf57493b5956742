"""Index users by email (one index per physical table: ix_users_email_0 ...)."""


def upgrade(op):
    op.create_index("ix_users_email", "users", ["email"])


def downgrade(op):
    op.drop_index("ix_users_email", "users")
