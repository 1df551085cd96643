"""The review desk in a browser: the inbox of steps waiting for a person, the
directive list, each directive's page (live graph, attempts with checks,
verdicts and diffs, generations, events) and its actions.

It reads Postgres and acts only through the directive workflow's updates.
Served by `makima dev` (next to the stack) and `makima console` (against any
deployment: TEMPORAL_ADDRESS and DATABASE_URL). Who may use it: console/auth.py.

- `app.py`: the routes; `auth.py`: who is signed in; `graph.py`: the step graph
  as SVG; `templates/`, `static/`: the pages, their script and style.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

DEFAULT_PORT = 8234
#: Postgres connections a console holds at most: page reads borrow one each for a
#: moment, and every open page's live events share one LISTEN connection.
POOL_SIZE = 10


@contextlib.asynccontextmanager
async def running_console(host: str, port: int, *, database_url: str | None = None,
                          ui_url: str = "", temporal_address: str | None = None,
                          ) -> AsyncIterator[str]:
    """Serve the console until the block ends; yields its URL. Raises SpecError
    (before binding anything) when it would listen beyond loopback without users."""
    import uvicorn

    from makima.console.app import Console, build_app, lazy_temporal
    from makima.console.auth import access_for
    from makima.review import os_user
    from makima.store import create_pool
    from makima.store.watch import SharedListener

    access = access_for(host, os.environ, os_user())
    pool = await create_pool(database_url, min_size=1, max_size=POOL_SIZE)
    listener = SharedListener(pool)
    server = None
    task = None
    try:
        app = build_app(Console(pool=pool, temporal=lazy_temporal(temporal_address), access=access,
                                ui_url=ui_url, listener=listener))
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                               lifespan="off", timeout_graceful_shutdown=2))
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it (a port in use, ...)
                raise OSError(f"the console could not listen on {host}:{port}")
            await asyncio.sleep(0.05)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{port}"
    finally:
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        await listener.close()
        await pool.close()


async def run_console(host: str, port: int) -> int:
    """`makima console`: serve until Ctrl-C or SIGTERM."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from makima.cli.commands import ui_base

    async with running_console(host, port, ui_url=ui_base()) as url:
        print(f"makima console: ready {url}", flush=True)
        await stop.wait()
    print("makima console: stopped", flush=True)
    return 0
