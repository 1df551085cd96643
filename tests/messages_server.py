"""A small Anthropic Messages API on loopback, scripted per test.

The real `anthropic` client talks to it through `base_url` (or the
`ANTHROPIC_BASE_URL` environment variable). Each `POST /v1/messages` takes the
next scripted reply; every request body and its headers are kept so a test can
assert on what makima sent. When the script runs dry the server answers 500
with a message saying so, which fails the test loudly instead of hanging.

    with MessagesServer() as server:
        server.script(text_reply("hello"), error_reply(429, headers={"retry-after": "1"}))
        client = AsyncAnthropic(base_url=server.base_url, api_key="test", max_retries=0)
"""

from __future__ import annotations

import itertools
import json
import threading
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


class MessagesServer:
    """Serves scripted replies on 127.0.0.1 at an OS-chosen port."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self._script: list[Reply | Responder] = []
        self._lock = threading.Lock()
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

    def _next(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if not self._script:
                return error_reply(500, "MessagesServer: no scripted reply left for this request")
            item = self._script.pop(0)
        return item(request) if callable(item) else item

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
                    reply = server._next(request)
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.send_header("request-id", f"req_test_{next(_ids)}")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

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
