"""`python -m bench.console`: how long the console takes to render its two busiest
pages on a full read model. It starts an embedded Postgres in a temporary
folder, records `--directives` directives (5 steps each; `--waiting` of them with
a step waiting for a person, its attempt and evaluation) through the same event
projection the workers use, then renders the inbox and the directive list
(default filters: the newest 200) `--requests` times each, in process, through
the console's ASGI app, and prints p50 / p95 / max of the server's time from
request to the last byte. Target: p95 <= 200 ms on 2 cores. Then `--tabs` open
directive pages follow one directive's events (the console's server-sent events,
woken by one shared LISTEN connection) while `--events` new events are recorded
one at a time: it prints p50 / p95 / max from recording an event to each page
getting it, and the pool's size, which stays within the console's. Stops its
Postgres by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from makima.console import POOL_SIZE
from makima.console.app import Console, build_app
from makima.console.auth import Access
from makima.contracts import EventType
from makima.store import create_pool
from makima.store.embedded import start_embedded, stop_embedded
from makima.store.watch import SharedListener
from makima.store.writes import record_events
from tests.postgres_fixture import Emitter, directive_status, started, step_status

STEPS = ["design", "build", "test", "docs", "ship"]


def directive_events(index: int, waiting: bool) -> list[Any]:
    emit = Emitter(f"directive-bench-{index:05d}")
    events = [started(emit, title=f"bench directive {index}", owner=f"owner{index % 7}"),
              directive_status(emit, "active")]
    for position, name in enumerate(STEPS):
        status = "passed" if position < 2 else "pending"
        if waiting and position == 2:
            status = "awaiting_approval"
        events.append(step_status(emit, name, status, attempts=1 if position <= 2 else 0))
    if waiting:
        step = Emitter(emit.directive_id, source=f"{emit.directive_id}/g1/test")
        key = {"step": "test", "attempt": 1}
        events += [
            step(EventType.ATTEMPT_FINISHED, {"success": True, "branch":
                 f"makima/{emit.directive_id}--steps/test", "commit": "ab" * 20,
                 "summary": "ran", "output_tail": "ok\n" * 50}, **key),
            step(EventType.EVALUATION, {"passed": True, "score": 0.6, "confidence": "yellow",
                 "summary": "close", "checks": [{"command": "pytest -q", "exit_code": 1,
                                                  "required": False, "output_tail": "1 failed"}],
                 "criteria": [{"criterion": "has tests", "passed": False, "score": 0.4,
                               "evidence": "no test file"}]}, **key),
            step(EventType.APPROVAL_REQUESTED, {"score": 0.6, "summary": "close"}, **key),
        ]
    return events


async def fill(pool: Any, directives: int, waiting: int) -> None:
    every = max(1, directives // max(1, waiting))
    batch: list[Any] = []
    for index in range(directives):
        batch += directive_events(index, waiting=index % every == 0 and index // every < waiting)
        if len(batch) > 2000:
            await record_events(pool, batch)
            batch = []
    if batch:
        await record_events(pool, batch)


async def render(app: Any, path: str) -> tuple[float, int, str]:
    """One GET through the ASGI app: (seconds to the last byte, status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    status, chunks = 0, []
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    began = time.perf_counter()
    await app(scope, receive, send)
    return time.perf_counter() - began, status, b"".join(chunks).decode()


async def follow(app: Any, path: str, query: str, opened: asyncio.Queue[None],
                 arrived: list[float], noticed: Any, close: asyncio.Event) -> None:
    """One open page's event stream through the ASGI app: notes when each event
    arrives, until `close` (the tab closes)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "", "headers": [(b"host", b"bench")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive() -> dict[str, Any]:
        await close.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            opened.put_nowait(None)
        elif message["type"] == "http.response.body" and b"data: " in message.get("body", b""):
            arrived.append(time.perf_counter())
            noticed()

    await app(scope, receive, send)


async def fan_out(pool: Any, tabs: int, events: int) -> None:
    listener = SharedListener(pool)
    app = build_app(Console(pool=pool, temporal=lambda: None, access=Access(anyone_is="b"),
                            listener=listener))
    directive_id = "directive-bench-00000"
    after = max(e.position for e in await reads_tail(pool, directive_id))
    opened: asyncio.Queue[None] = asyncio.Queue()
    arrivals: list[list[float]] = [[] for _ in range(tabs)]
    close, everywhere, wanted = asyncio.Event(), asyncio.Event(), [0]

    def noticed() -> None:
        if all(len(a) >= wanted[0] for a in arrivals):
            everywhere.set()

    pages = [asyncio.create_task(follow(app, f"/directives/{directive_id}/events",
                                        f"after={after}", opened, arrivals[i], noticed, close))
             for i in range(tabs)]
    for _ in range(tabs):
        await opened.get()
    await asyncio.sleep(1.0)  # every stream past its backlog, listening
    live = Emitter(directive_id, source=f"{directive_id}/bench-live")
    delays: list[float] = []
    for n in range(1, events + 1):
        wanted[0] = n
        everywhere.clear()
        recorded = time.perf_counter()
        await record_events(pool, [live(EventType.MERGED, {"n": n})])
        await asyncio.wait_for(everywhere.wait(), 60)
        delays += [(a[n - 1] - recorded) * 1000 for a in arrivals]
    print(f"{tabs} open pages, {events} events: recorded -> on every page p50 "
          f"{statistics.median(delays):.1f} ms, p95 {quantile(delays, 0.95):.1f} ms, max "
          f"{max(delays):.1f} ms; pool {pool.get_size()} connections (at most {POOL_SIZE}), "
          f"{listener.channels} LISTEN channel")
    close.set()
    await asyncio.gather(*pages, return_exceptions=True)
    await listener.close()


async def reads_tail(pool: Any, directive_id: str) -> list[Any]:
    from makima.store.reads import event_tail

    return await event_tail(pool, directive_id, limit=1)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directives", type=int, default=1000)
    parser.add_argument("--waiting", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tabs", type=int, default=100)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mk-bench-console-"))
    server = await start_embedded(home)
    try:
        pool = await create_pool(server.url, min_size=2, max_size=POOL_SIZE)
        began = time.perf_counter()
        await fill(pool, args.directives, args.waiting)
        filled = time.perf_counter() - began
        app = build_app(Console(pool=pool, temporal=lambda: None, access=Access(anyone_is="b")))
        print(f"console render, {args.directives} directives ({args.waiting} waiting) filled "
              f"in {filled:.1f} s; {platform.python_version()}, {platform.machine()}")
        print(f"{'page':<12} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'KiB':>6}  items")
        for name, path, count in (
                ("inbox", "/", lambda body: body.count('class="card waiting"')),
                ("directives", "/directives", lambda body: body.count('href="/directives/'))):
            await render(app, path)  # warm: templates compiled, statements prepared
            times, body = [], ""
            for _ in range(args.requests):
                seconds, status, body = await render(app, path)
                assert status == 200, status
                times.append(seconds * 1000)
            print(f"{name:<12} {statistics.median(times):8.1f} {quantile(times, 0.95):8.1f} "
                  f"{max(times):8.1f} {len(body.encode()) / 1024:6.0f}  {count(body)}")
        await fan_out(pool, args.tabs, args.events)
        await pool.close()
    finally:
        stop_embedded(server.pid)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
