"""makima's read model and audit trail in Postgres (asyncpg).

- `pool.create_pool()`: the pool a worker or the CLI builds once (DATABASE_URL,
  else the embedded server under MAKIMA_HOME), migrated;
- `migrate`: the SQL migrations and their runner;
- `writes.record_events()`: idempotent projection of workflow events;
- `reads`: the read API; `watch.watch_events()`: backlog then live events;
- `embedded`: start, attach to and stop the embedded Postgres.
"""

from makima.store.errors import InvalidFilter, NotFound, StoreError
from makima.store.pool import create_pool, resolve_database_url

__all__ = ["InvalidFilter", "NotFound", "StoreError", "create_pool", "resolve_database_url"]
