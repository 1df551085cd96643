"""The test session's Postgres: the embedded server, started once per session in
a temporary folder and stopped by pid at the end (even when tests fail).

Use it from a test module with

    from tests.postgres_fixture import postgres, pg_pool  # noqa: F401

`postgres` is the running server (`.url` is the migrated `makima` database);
`pg_pool` is a pool on it. Tests share one database, so each test uses its own
directive ids (`unique_id()`). `Emitter` and friends build events the way
the workflows emit them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from makima.contracts import Event, EventType
from makima.store.embedded import (
    EmbeddedPostgres,
    running_embedded,
    start_embedded,
    stop_embedded,
)
from makima.store.pool import create_pool


def unique_id(prefix: str = "directive-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
async def postgres() -> AsyncIterator[EmbeddedPostgres]:
    # A short path: the server's unix socket lives in its data folder and socket
    # paths are limited to about 100 bytes.
    home = Path(tempfile.mkdtemp(prefix="makima-pg-"))
    server: EmbeddedPostgres | None = None
    try:
        server = await start_embedded(home)
        # Durability is pointless for a throwaway test database; this makes commits cheap.
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("ALTER SYSTEM SET fsync = off")
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("ALTER SYSTEM SET full_page_writes = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        # Migrate once here so tests that use the URL directly see the schema.
        pool = await create_pool(server.url, min_size=1, max_size=2)
        await pool.close()
        yield server
    finally:
        # Also when start_embedded failed half way (server up, database not made).
        pid = server.pid if server is not None else running_embedded(home)
        if pid is not None:
            stop_embedded(pid)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
async def pg_pool(postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(postgres.url, min_size=2, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


# --------------------------------------------------------------------------- events

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Emitter:
    """Emits events for one source the way a workflow does: seq counts from 1."""

    def __init__(self, directive_id: str, source: str | None = None) -> None:
        self.directive_id = directive_id
        self.source = source or directive_id
        self.seq = 0

    def __call__(self, type: EventType, data: dict[str, Any] | None = None, **fields: Any) -> Event:
        self.seq += 1
        return Event(
            directive_id=self.directive_id,
            source=self.source,
            seq=self.seq,
            at=T0 + timedelta(seconds=self.seq),
            type=type,
            data=data or {},
            **fields,
        )


def started(emit: Emitter, title: str = "Add a greeting", owner: str = "ana") -> Event:
    return emit(
        EventType.DIRECTIVE_STARTED,
        {"spec": {"title": title, "owner": owner}, "title": title, "owner": owner,
         "integration_branch": f"makima/{emit.directive_id}"},
    )


def directive_status(emit: Emitter, status: str, generation: int = 1, **extra: Any) -> Event:
    return emit(EventType.DIRECTIVE_STATUS,
                {"status": status, "reason": "", "generation": generation, "cost_usd": 0.0,
                 "breaker": None, **extra}, generation=generation)


def step_status(emit: Emitter, step: str, status: str, attempts: int = 0,
                score: float | None = None, generation: int = 1) -> Event:
    return emit(EventType.STEP_STATUS,
                {"status": status, "attempts": attempts, "score": score, "confidence": None,
                 "depends_on": [], "description": f"do {step}", "summary": "", "reason": "",
                 "workflow_id": f"{emit.directive_id}/g{generation}/{step}"},
                step=step, generation=generation)
