"""The Alembic migrations build exactly the models' schema, on Postgres and SQLite, and undo cleanly."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dispatcher.store import db
from dispatcher.store.tables import Base


def _diff(url: str) -> list[object]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                         Base.metadata))
    finally:
        engine.dispose()


def test_postgres_migrations_match_the_models(database_url: str) -> None:
    assert _diff(database_url) == []


def test_postgres_migrations_downgrade_to_nothing_and_up_again(database_url: str) -> None:
    db.downgrade(database_url, "base")
    engine = db.make_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    db.upgrade(database_url)
    assert _diff(database_url) == []


def test_sqlite_migrations_match_the_models_and_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    db.upgrade(url)
    assert _diff(url) == []
    engine = db.make_engine(url)
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()
    db.downgrade(url, "base")
    engine = db.make_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
