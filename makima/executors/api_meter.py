"""What the model API bills the calls Claude Code makes, read where they pass:
makima's model proxy (makima/executors/model_proxy.py).

The CLI reports what a run cost only in its final `result` message, which a CLI
killed by a stop (or crashed) never writes; and the usage its stream carries for
each message is the one the API sent as the message began (`message_start`,
before any output token was generated). The proxy relays every answer whole, so
`ApiMeter` reads each one's usage there, the final output tokens included
(`message_delta`), and prices it with makima's table (makima/llm/pricing.py),
as the `anthropic` executor prices its calls.

A call still out when the CLI is killed is not cut off at the API, which goes on
generating the answer and bills it. The proxy reads such an answer to its end
all the same (nobody is left to relay it to), and `settled()` lets the executor
wait for it, as makima/llm/client.py waits for a cancelled call of its own.

Only answers of `POST /v1/messages` with status 200 are billed (an error answer
is not; `count_tokens` is free). An answer that ends early counts what it had
said so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from makima.llm.pricing import usage_from_api
from makima.models import Usage

#: The one path whose answers are billed (a query string may follow).
MESSAGES_PATH = "/v1/messages"


class ApiMeter:
    """The usage of every call one proxy relayed, by the id of the message that
    answered it. `on_call(total)` is told the new total after each answer."""

    def __init__(self, on_call: Callable[[Usage], None] = lambda total: None) -> None:
        self.calls: dict[str, Usage] = {}
        self._on_call = on_call
        self._out = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around one call, from its request to the end of its answer."""
        self._out += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._out -= 1
            if self._out == 0:
                self._idle.set()

    def answer(self, method: str, target: str, status_line: str,
               headers: list[tuple[str, str]], request_body: bytes) -> AnswerReading | None:
        """A reader for the answer to a request, when that answer is billed."""
        path = target.split("?", 1)[0].rstrip("/")
        status = status_line.split(" ", 2)
        if (method.upper() != "POST" or path != MESSAGES_PATH or len(status) < 2
                or status[1] != "200"):
            return None
        fields = {name.lower(): value.lower() for name, value in headers}
        return AnswerReading(chunked="chunked" in fields.get("transfer-encoding", ""),
                             events="text/event-stream" in fields.get("content-type", ""),
                             request_body=request_body)

    @property
    def total(self) -> Usage:
        return sum(self.calls.values(), Usage())

    def count(self, answer: AnswerReading) -> None:
        used = answer.usage()
        if used is None:
            return
        self.calls[answer.message_id or f"unnamed-{len(self.calls)}"] = used
        self._on_call(self.total)

    async def settled(self, timeout: float) -> bool:
        """Wait until no call is out (each one's answer is counted); False when one
        still is after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()


class AnswerReading:
    """One answer's body as it streams by: server-sent events (message_start, then
    message_delta with the final usage) or one JSON message."""

    def __init__(self, *, chunked: bool, events: bool, request_body: bytes = b"") -> None:
        self._chunks = _Dechunker() if chunked else None
        self._events = events
        self._pending = b""  # events: the line not ended yet; JSON: the body so far
        #: the model that answered; else the one asked for (read from the request only
        #: then: a request holds the whole conversation)
        self.model = ""
        self._request_body = request_body
        self.message_id = ""
        self._usage: dict[str, Any] | None = None

    def feed(self, data: bytes) -> None:
        body = self._chunks.feed(data) if self._chunks is not None else data
        if not self._events:
            self._pending += body
            return
        *lines, self._pending = (self._pending + body).split(b"\n")
        for line in lines:
            self._event_line(line.strip())

    def usage(self) -> Usage | None:
        """The answer's usage priced; None when it named none."""
        if not self._events and self._pending:
            message = _json(self._pending)
            if message is not None:
                self._message(message)
        elif self._pending:
            self._event_line(self._pending.strip())
            self._pending = b""
        if self._usage is None:
            return None
        return usage_from_api(self.model or _asked_model(self._request_body), self._usage)

    def _event_line(self, line: bytes) -> None:
        # only two kinds of event name a usage: the text deltas in between, nearly all
        # of an answer, are not parsed
        if not line.startswith(b"data:") or not (b'"message_start"' in line
                                                 or b'"message_delta"' in line):
            return
        event = _json(line[5:])
        if event is None:
            return
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            self._message(event["message"])
        elif event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
            # the delta's counts are the message's totals so far
            self._usage = {**(self._usage or {}),
                           **{k: v for k, v in event["usage"].items() if v is not None}}

    def _message(self, message: dict[str, Any]) -> None:
        if isinstance(message.get("id"), str):
            self.message_id = message["id"]
        if isinstance(message.get("model"), str) and message["model"]:
            self.model = message["model"]
        if isinstance(message.get("usage"), dict):
            self._usage = dict(message["usage"])


class _Dechunker:
    """HTTP/1.1 chunked transfer coding, undone a piece at a time."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk still to come, then its CRLF
        self._done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self._done:
            if self._left == 0:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                size_text = self._buffer[:end].split(b";", 1)[0].strip()
                self._buffer = self._buffer[end + 2:]
                if not size_text:  # the CRLF that ends a chunk's data
                    continue
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    self._done = True
                    break
                if self._left == 0:
                    self._done = True  # trailers may follow; they carry no body
                    break
            taken = self._buffer[:self._left]
            out += taken
            self._buffer = self._buffer[len(taken):]
            self._left -= len(taken)
            if self._left:
                break
        return bytes(out)


def _json(text: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _asked_model(request_body: bytes) -> str:
    found = _json(request_body)
    model = found.get("model") if found else None
    return model if isinstance(model, str) else ""
