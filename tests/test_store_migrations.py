"""Schema migrations, the embedded server's start/attach, and DATABASE_URL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from makima.store.embedded import EmbeddedPostgres, running_embedded, start_embedded
from makima.store.migrate import available_migrations, migrate
from makima.store.pool import create_pool
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401

TABLES = {"directives", "chains", "steps", "attempts", "evaluations", "approvals", "events"}


@pytest.fixture
async def empty_database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:  # noqa: F811
    """A brand-new database on the session server; dropped afterwards."""
    name = f"empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres.database_url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres.database_url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def database_name(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_migrations_apply_from_empty_and_rerun_applies_nothing(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        applied = await migrate(conn)
        assert applied == [m.version for m in available_migrations()]
        assert applied[0] == "0001_initial"
        assert TABLES | {"schema_migrations"} <= await _tables(conn)

        assert await migrate(conn) == []
        recorded = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == applied
    finally:
        await conn.close()


async def test_two_migrators_at_once_apply_each_migration_exactly_once(empty_database: str) -> None:
    first = await asyncpg.connect(empty_database)
    second = await asyncpg.connect(empty_database)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
        # One did the work, the other waited on the advisory lock and found it done.
        assert sorted(results, key=len) == [[], [m.version for m in available_migrations()]]
        assert TABLES <= await _tables(first)
        count = await first.fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(available_migrations())
    finally:
        await first.close()
        await second.close()


async def test_start_attaches_to_the_running_server(postgres: EmbeddedPostgres) -> None:  # noqa: F811
    home = postgres.pgdata.parent
    again = await start_embedded(home)
    assert again.pid == postgres.pid
    assert again.url == postgres.url
    assert running_embedded(home) == postgres.pid


async def test_without_database_url_the_embedded_server_under_makima_home_is_used(
    postgres: EmbeddedPostgres,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("MAKIMA_HOME", str(postgres.pgdata.parent))
    pool = await create_pool(min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SHOW data_directory") == str(postgres.pgdata)
        assert await pool.fetchval("SELECT current_database()") == "makima"
    finally:
        await pool.close()


async def test_database_url_points_the_pool_at_another_server_and_starts_nothing(
    postgres: EmbeddedPostgres,  # noqa: F811
    empty_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An "external" server: the session's, reached only through DATABASE_URL. A
    # MAKIMA_HOME with no server in it shows no embedded server gets started.
    monkeypatch.setenv("DATABASE_URL", empty_database)
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path))
    pool = await create_pool(min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SELECT current_database()") == database_name(empty_database)
        # and it was migrated on the way
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == len(available_migrations())
    finally:
        await pool.close()
    assert not (tmp_path / "postgres").exists()
    assert running_embedded(tmp_path) is None
