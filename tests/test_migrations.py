"""Alembic: the migrations build the same schema as the models, both ways, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from reportflow.shared.db import make_engine
from reportflow.shared.migrate import downgrade, upgrade
from reportflow.shared.models import Base


def test_migrations_match_the_models_and_go_down_and_up_again(database_url):
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        downgrade(database_url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(database_url)
        assert {
            "reports",
            "approval_stages",
            "decisions",
            "refusals",
            "documents",
            "notifications",
            "inbox",
            "outbox",
        } <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
