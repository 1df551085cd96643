"""Schema migrations: the `NNNN_name.sql` files in `migrations/`, applied in
order, each in its own transaction together with its row in `schema_migrations`.

A session advisory lock makes two workers starting at once safe: the second
waits, then finds everything applied. Re-running applies nothing.

Run from the command line as `python -m makima.store.migrate` (the CLI's
`migrate` calls `run_migrations()`).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from importlib import resources

import asyncpg

#: Any constant unique to makima; pg_advisory_lock keys are one bigint.
MIGRATION_LOCK_KEY = 0x6D616B696D61  # "makima"


@dataclass(frozen=True)
class Migration:
    version: str  # the file name without .sql, e.g. "0001_initial"
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("makima.store") / "migrations"
    files = sorted(
        (f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name
    )
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded; return the versions applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
                )
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def run_migrations(database_url: str | None = None) -> list[str]:
    """Migrate the configured database (`DATABASE_URL`, else the embedded one,
    started if needed)."""
    from makima.store.pool import resolve_database_url

    conn = await asyncpg.connect(await resolve_database_url(database_url))
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def main() -> int:
    applied = asyncio.run(run_migrations())
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
