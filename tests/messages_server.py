"""A small Anthropic Messages API on loopback, scripted per test.

The real `anthropic` client talks to it through `base_url` (or the
`ANTHROPIC_BASE_URL` environment variable). Each `POST /v1/messages` takes the
next scripted reply; every request body and its headers are kept so a test can
assert on what makima sent. When the script runs dry the server answers 500
with a message saying so, which fails the test loudly instead of hanging.

A reply is billed once it has been generated (a `slow` reply: after its
generation time), whether or not the client is still there to read it: a client
that hangs up mid-call is billed all the same, as a conservative model of the
real API, which goes on generating an answer whose caller has gone.

    with MessagesServer() as server:
        server.script(text_reply("hello"), error_reply(429, headers={"retry-after": "1"}))
        client = AsyncAnthropic(base_url=server.base_url, api_key="test", max_retries=0)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def text(self) -> str:
        """Every text the request carried (system and messages), joined: for asserting
        that a prompt contains something."""
        return json.dumps(self.body, ensure_ascii=False)


def usage(input_tokens: int = 100, output_tokens: int = 50, cache_read: int = 0,
          cache_write: int = 0) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
    }


def _message(content: list[dict[str, Any]], stop_reason: str, model: str,
             used: dict[str, int] | None) -> Reply:
    return Reply(200, {
        "id": f"msg_test_{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": used or usage(),
    })


def text_reply(text: str, *, model: str = "claude-test", used: dict[str, int] | None = None) -> Reply:
    return _message([{"type": "text", "text": text}], "end_turn", model, used)


def tool_reply(name: str, tool_input: dict[str, Any], *, text: str = "",
               model: str = "claude-test", used: dict[str, int] | None = None,
               tool_id: str | None = None) -> Reply:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content.append({"type": "tool_use", "id": tool_id or f"toolu_{next(_ids)}", "name": name,
                    "input": tool_input})
    return _message(content, "tool_use", model, used)


def error_reply(status: int, message: str = "", *, headers: dict[str, str] | None = None) -> Reply:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 500: "api_error",
             529: "overloaded_error"}
    kind = kinds.get(status, "api_error")
    return Reply(status, {"type": "error", "error": {"type": kind, "message": message or kind}},
                 headers or {})


Responder = Callable[[ReceivedRequest], Reply]


def slow(reply: Reply, seconds: float) -> Responder:
    """`reply`, generated (and billed) `seconds` after the request arrived: a call that
    is in flight that long."""
    def generate(request: ReceivedRequest) -> Reply:
        time.sleep(seconds)
        return reply
    return generate


def sse_events(message: dict[str, Any]) -> bytes:
    """A complete Messages API reply as the server-sent events a `stream: true`
    request gets (message_start, one start/delta/stop per content block,
    message_delta with the stop reason and output tokens, message_stop)."""
    used = dict(message.get("usage") or {})
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {
        "type": "message_start",
        "message": {**message, "content": [], "stop_reason": None,
                    "usage": {**used, "output_tokens": 1}}})]
    for index, block in enumerate(message.get("content") or []):
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            start = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [("content_block_start", {"type": "content_block_start", "index": index,
                                            "content_block": start}),
                   ("content_block_delta", {"type": "content_block_delta", "index": index,
                                            "delta": delta}),
                   ("content_block_stop", {"type": "content_block_stop", "index": index})]
    events += [("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": message.get("stop_reason"),
                                            "stop_sequence": None},
                                  "usage": {"output_tokens": used.get("output_tokens", 0)}}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                    for name, data in events)


#: Anthropic's prompt cache: an entry lives this long after it was last used.
CACHE_TTL_SECONDS = 300.0
#: How many blocks before a breakpoint the API looks for an earlier cache entry.
LOOKBACK_BLOCKS = 20
#: Shortest prefix the API caches (Sonnet and Opus; Haiku's is longer).
MIN_CACHEABLE_TOKENS = 1024


def estimated_tokens(value: Any) -> int:
    """About what the API would count: four characters a token."""
    return max(1, len(json.dumps(value, ensure_ascii=False, sort_keys=True)) // 4)


def prompt_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's prompt in the API's cache order: tools, then system, then every
    message's content blocks (a string content is one text block)."""
    blocks: list[dict[str, Any]] = [dict(tool) for tool in body.get("tools") or []]
    system = body.get("system") or []
    blocks += [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    for message in body.get("messages") or []:
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        blocks += [{"role": message.get("role"), **block} for block in items or []]
    return blocks


class PromptCache:
    """Anthropic's caching rules, applied to a request's usage: the longest prefix
    that an earlier request wrote within CACHE_TTL_SECONDS and that ends at a
    breakpoint (`cache_control`) or at most LOOKBACK_BLOCKS blocks before one is a
    cache read; the rest
    up to the last breakpoint is a cache write; what follows is ordinary input.
    Prefixes shorter than MIN_CACHEABLE_TOKENS are neither read nor written."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, float] = {}

    @staticmethod
    def _key(blocks: list[dict[str, Any]]) -> str:
        plain = [{k: v for k, v in block.items() if k != "cache_control"} for block in blocks]
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()

    def usage_for(self, body: dict[str, Any], output_tokens: int) -> dict[str, int]:
        now = self.clock()
        blocks = prompt_blocks(body)
        sizes = [estimated_tokens({k: v for k, v in b.items() if k != "cache_control"})
                 for b in blocks]
        breakpoints = [i for i, block in enumerate(blocks) if block.get("cache_control")]
        total = sum(sizes)
        if not breakpoints:
            return usage(total, output_tokens)
        last = breakpoints[-1]
        read_end = -1  # index of the last block read from the cache
        candidates = sorted({end for point in breakpoints
                             for end in range(max(point - LOOKBACK_BLOCKS, 0), point + 1)},
                            reverse=True)
        for end in candidates:
            key = self._key(blocks[:end + 1])
            seen = self._entries.get(key)
            if seen is not None and now - seen <= CACHE_TTL_SECONDS:
                read_end = end
                self._entries[key] = now  # a read refreshes the entry
                break
        read = sum(sizes[:read_end + 1])
        cached = sum(sizes[:last + 1])
        if cached < MIN_CACHEABLE_TOKENS:
            return usage(total, output_tokens)
        for point in breakpoints:
            if sum(sizes[:point + 1]) >= MIN_CACHEABLE_TOKENS:
                self._entries[self._key(blocks[:point + 1])] = now
        return usage(total - cached, output_tokens, cache_read=read, cache_write=cached - read)


class MessagesServer:
    """Serves scripted replies on 127.0.0.1 at an OS-chosen port. With
    `caching=True` each successful reply's input usage is what Anthropic's caching
    rules (PromptCache) would bill for the request it answers."""

    def __init__(self, *, caching: bool = False) -> None:
        self.cache = PromptCache() if caching else None
        self.requests: list[ReceivedRequest] = []
        #: (model asked for, usage) of every reply that was billed, i.e. answered 200
        self.billed: list[tuple[str, dict[str, Any]]] = []
        self._script: list[Reply | Responder] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting
    def script(self, *replies: Reply | Responder) -> None:
        """Append replies; a callable is called with the request and returns a Reply."""
        with self._lock:
            self._script.extend(replies)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered (every call in flight was generated
        and billed); False after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _answer(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self._in_flight += 1
        try:
            return self._next(request)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _next(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if not self._script:
                return error_reply(500, "MessagesServer: no scripted reply left for this request")
            item = self._script.pop(0)
        reply = item(request) if callable(item) else item
        if self.cache is not None and reply.status == 200 and "usage" in reply.body:
            output = int(reply.body["usage"].get("output_tokens") or 0)
            with self._lock:
                billed = self.cache.usage_for(request.body, output)
            reply = Reply(reply.status, {**reply.body, "usage": billed}, reply.headers)
        if reply.status == 200 and "usage" in reply.body:
            with self._lock:
                self.billed.append((str(request.body.get("model", "")), reply.body["usage"]))
        return reply

    # -- lifecycle
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MessagesServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                request = ReceivedRequest(self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body)
                if not self.path.startswith("/v1/messages"):
                    reply = error_reply(404, f"unknown path {self.path}")
                else:
                    reply = server._answer(request)
                streamed = reply.status == 200 and bool(body.get("stream"))
                payload = sse_events(reply.body) if streamed else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type",
                                 "text/event-stream" if streamed else "application/json")
                self.send_header("content-length", str(len(payload)))
                self.send_header("request-id", f"req_test_{next(_ids)}")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)  # a client that timed out has gone

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MessagesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
