"""The regional store: models, migrations, batched idempotent writers, and read queries."""
