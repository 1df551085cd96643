"""How Claude Code reaches the model API from a sandbox without network and
without the worker's API key.

Inside the sandbox, `FORWARDER` (a small Python program started before the CLI)
listens on the sandbox's own loopback (`127.0.0.1:SANDBOX_API_PORT`, invisible
to the worker's loopback) and relays every connection to a unix socket that
makima binds into the sandbox. Outside, `ModelProxy` serves that socket: it
reads each HTTP request, replaces whatever credentials it carries with the
worker's (ANTHROPIC_API_KEY as `x-api-key`, or ANTHROPIC_AUTH_TOKEN as a
bearer token), sends it to ANTHROPIC_BASE_URL (default the Anthropic API) and
relays the answer back byte for byte (server-sent events included).

So the CLI and every command it runs see a placeholder key, reach nothing but
the model API, and cannot read the real key from any environment or file.

Every call passes here, so the proxy is also where what they are billed is read
(an `ApiMeter`, makima/executors/api_meter.py). It asks the API for answers
without compression, so that they can be read; and it reads an answer to its
end even when the CLI has gone (killed by a stop), since the API bills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from makima.executors.api_meter import ApiMeter

#: The port the forwarder listens on inside the sandbox's network namespace.
SANDBOX_API_PORT = 8787
#: What the CLI gets as its API key: the proxy puts the real one in.
PLACEHOLDER_KEY = "makima-sandbox-placeholder"
DEFAULT_API_URL = "https://api.anthropic.com"
_DROPPED = {"host", "x-api-key", "authorization", "connection", "keep-alive",
            "proxy-connection", "content-length", "transfer-encoding", "accept-encoding"}

#: Run inside the sandbox as `python FORWARDER_FILE SOCKET PORT CLI ARGS...`: a
#: forked child relays 127.0.0.1:PORT to SOCKET; the parent waits until it
#: listens, then becomes the CLI.
FORWARDER = r'''
import asyncio, os, socket, sys, time

sock_path, port, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(sock_path)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def serve():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    await server.serve_forever()


if os.fork() == 0:
    os.closerange(3, 256)
    asyncio.run(serve())
    os._exit(0)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.02)
os.execv(argv[0], argv)
'''


def _credentials() -> list[tuple[str, str]]:
    key = (os.environ.get("ANTHROPIC_API_KEY") or "").strip()
    if key:
        return [("x-api-key", key)]
    token = (os.environ.get("ANTHROPIC_AUTH_TOKEN") or "").strip()
    return [("authorization", f"Bearer {token}")] if token else []


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    fields = {name.lower(): value for name, value in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                # trailers end with an empty line
                while chunk != b"\r\n":
                    chunk = await reader.readuntil(b"\r\n")
                return body
            body += chunk[:-2]
    length = int(fields.get("content-length") or 0)
    return await reader.readexactly(length) if length else b""


class ModelProxy:
    """`async with ModelProxy(socket_path):` serves the model API on a unix socket
    with the worker's credentials, until the block ends (a call still out then is
    abandoned). With no `socket_path` it serves on a port of the worker's loopback
    instead (`base_url`), for a CLI that runs without the sandbox. `meter` counts
    what every call is billed."""

    def __init__(self, socket_path: Path | None, upstream: str | None = None,
                 meter: ApiMeter | None = None) -> None:
        self.socket_path = socket_path
        self.meter = meter or ApiMeter()
        self._serving: set[asyncio.Task[None]] = set()
        base = (upstream or os.environ.get("ANTHROPIC_BASE_URL") or "").strip() or DEFAULT_API_URL
        parts = urlsplit(base)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.secure else 80)
        self.prefix = parts.path.rstrip("/")
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> ModelProxy:
        if self.socket_path is not None:
            self._server = await asyncio.start_unix_server(self._serve,
                                                           path=str(self.socket_path))
        else:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def base_url(self) -> str:
        """Where a CLI on the worker's own loopback reaches the proxy."""
        assert self._server is not None and self.socket_path is None, "not on a port"
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._serving):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A broken request or connection: the CLI sees a dropped connection and
        # retries; nothing to keep.
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                     ConnectionError, ValueError, OSError):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = [(name.strip(), value.strip()) for name, value in
                           (line.split(":", 1) for line in lines if ":" in line)]
                body = await _read_body(reader, headers)
                with self.meter.call():
                    await self._forward(method, target, headers, body, writer)
        finally:
            self._serving.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _forward(self, method: str, target: str, headers: list[tuple[str, str]],
                       body: bytes, writer: asyncio.StreamWriter) -> None:
        context = ssl.create_default_context() if self.secure else None
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        try:
            host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
            kept = [(n, v) for n, v in headers if n.lower() not in _DROPPED]
            sent = [("host", host), *kept, *_credentials(), ("content-length", str(len(body))),
                    ("accept-encoding", "identity"), ("connection", "close")]
            head = f"{method} {self.prefix}{target} HTTP/1.1\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in sent) + "\r\n"
            up_writer.write(head.encode("latin-1") + body)
            await up_writer.drain()
            # The answer goes back as it comes, in its own framing, marked
            # `connection: close` so the CLI opens a new connection for the next one.
            answer = (await up_reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status, *fields = answer.rstrip("\r\n").split("\r\n")
            fields = [f for f in fields if not f.lower().startswith(("connection:", "keep-alive:"))]
            answer_reading = self.meter.answer(
                method, target, status,
                [(n.strip(), v.strip()) for n, v in (f.split(":", 1) for f in fields if ":" in f)],
                body)
            relaying = True
            try:
                writer.write(("\r\n".join([status, *fields, "connection: close"]) + "\r\n\r\n")
                             .encode("latin-1"))
                while data := await up_reader.read(65536):
                    if answer_reading is not None:
                        answer_reading.feed(data)
                    if relaying:
                        try:
                            writer.write(data)
                            await writer.drain()
                        except (ConnectionError, OSError):
                            # the CLI has gone (a stop killed it): the API bills the
                            # answer all the same, so it is read to its end
                            relaying = False
                            if answer_reading is None:
                                break
            finally:
                if answer_reading is not None:
                    self.meter.count(answer_reading)
        finally:
            up_writer.close()
