"""The asyncpg pool: built once per worker (and once per CLI command) from
`DATABASE_URL`, or, when that is unset, from the embedded Postgres under
`MAKIMA_HOME`, which is started if it is not running. JSON columns come back as
Python objects. The schema is migrated before the pool is handed out.
"""

from __future__ import annotations

import json
import os

import asyncpg

from makima.store.embedded import start_embedded
from makima.store.errors import StoreError


async def resolve_database_url(database_url: str | None = None) -> str:
    """The argument, else `DATABASE_URL`, else the embedded server's URL."""
    url = database_url or os.environ.get("DATABASE_URL", "").strip()
    if url:
        return url
    return (await start_embedded()).url


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(
    database_url: str | None = None,
    *,
    min_size: int = 1,
    max_size: int = 10,
    apply_migrations: bool = True,
) -> asyncpg.Pool:
    """The one call a worker or the CLI makes: `pool = await create_pool()`.
    Close it with `await pool.close()`."""
    url = await resolve_database_url(database_url)
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, init=_init_connection
        )
    except (OSError, asyncpg.PostgresError) as error:
        raise StoreError(f"cannot connect to Postgres at {_redacted(url)}: {error}") from error
    if apply_migrations:
        # Imported here so `python -m makima.store.migrate` does not import itself twice.
        from makima.store.migrate import migrate

        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
    return pool


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
