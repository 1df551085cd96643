"""What the model proxy's meter reads from the answers it relays
(makima/executors/api_meter.py): the final usage of a streamed answer, in any
framing and however the bytes are cut, priced with makima's table; nothing for
an answer that is not billed. The whole path, with the real Claude Code CLI and
a stop, is tests/test_claude_code_cancel_billed.py."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from makima.executors.api_meter import AnswerReading, ApiMeter
from makima.executors.model_proxy import ModelProxy
from makima.llm.pricing import usage_from_api
from makima.models import Usage
from tests.messages_server import MessagesServer, slow, sse_events, tool_reply, usage

MODEL = "claude-sonnet-4-5"
SSE = [("content-type", "text/event-stream")]
CHUNKED_SSE = [*SSE, ("Transfer-Encoding", "chunked")]


def answer_body(used: dict[str, int]) -> dict:
    return tool_reply("Bash", {"command": "ls"}, text="Looking.", model=MODEL, used=used).body


def chunked(payload: bytes, rng: random.Random) -> bytes:
    """`payload` in HTTP/1.1 chunks of random sizes, with a chunk extension now and then."""
    out, at = b"", 0
    while at < len(payload):
        size = rng.randint(1, 200)
        piece = payload[at:at + size]
        extension = b";x=1" if rng.random() < 0.2 else b""
        out += f"{len(piece):x}".encode() + extension + b"\r\n" + piece + b"\r\n"
        at += size
    return out + b"0\r\n\r\n"


def fed(reading: AnswerReading, raw: bytes, rng: random.Random) -> AnswerReading:
    at = 0
    while at < len(raw):
        step = rng.randint(1, 97)
        reading.feed(raw[at:at + step])
        at += step
    return reading


def request_for(model: str = MODEL) -> bytes:
    return json.dumps({"model": model, "messages": [], "stream": True}).encode()


@pytest.mark.parametrize("seed", range(20))
def test_a_streamed_answer_counts_its_final_usage_however_it_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    used = usage(2100 + seed, 210 + seed, cache_read=500, cache_write=300)
    body = answer_body(used)
    raw = sse_events(body)  # message_start says 1 output token, message_delta the total
    meter = ApiMeter()
    headers = CHUNKED_SSE if seed % 2 else SSE
    reading = meter.answer("POST", "/v1/messages?beta=true", "HTTP/1.1 200 OK", headers,
                           request_for())
    assert reading is not None
    meter.count(fed(reading, chunked(raw, rng) if seed % 2 else raw, rng))

    assert meter.calls == {body["id"]: usage_from_api(MODEL, used)}
    assert meter.total.output_tokens == 210 + seed and meter.total.cost_usd > 0


def test_a_json_answer_counts_its_usage() -> None:
    used = usage(1000, 100)
    body = answer_body(used)
    meter = ApiMeter()
    reading = meter.answer("POST", "/v1/messages", "HTTP/1.1 200 OK",
                           [("Content-Type", "application/json")], request_for())
    assert reading is not None
    meter.count(fed(reading, json.dumps(body).encode(), random.Random(1)))
    assert meter.calls == {body["id"]: usage_from_api(MODEL, used)}


def test_a_delta_that_restates_the_input_counts_replace_the_starts() -> None:
    reading = AnswerReading(chunked=False, events=True, request_body=request_for())
    start = {"type": "message_start", "message": {
        "id": "msg_1", "model": MODEL, "usage": usage(10, 1)}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {**usage(12, 40, cache_read=7), "server_tool_use": None}}
    reading.feed(f"event: message_start\ndata: {json.dumps(start)}\n\n"
                 f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode())
    assert reading.usage() == usage_from_api(MODEL, usage(12, 40, cache_read=7))


def test_an_answer_cut_off_counts_what_it_had_said() -> None:
    raw = sse_events(answer_body(usage(3000, 300)))
    reading = AnswerReading(chunked=False, events=True, request_body=request_for())
    reading.feed(raw[:raw.index(b"event: message_delta")])
    counted = reading.usage()
    assert counted is not None
    assert (counted.input_tokens, counted.output_tokens) == (3000, 1)


@pytest.mark.parametrize(("method", "target", "status"), [
    ("POST", "/v1/messages", "HTTP/1.1 529 Overloaded"),
    ("POST", "/v1/messages", "HTTP/1.1 400 Bad Request"),
    ("POST", "/v1/messages/count_tokens", "HTTP/1.1 200 OK"),
    ("GET", "/v1/models", "HTTP/1.1 200 OK"),
])
def test_answers_that_are_not_billed_are_not_read(method: str, target: str, status: str) -> None:
    assert ApiMeter().answer(method, target, status, SSE, request_for()) is None


def test_an_answer_that_names_no_model_is_priced_for_the_model_asked_for() -> None:
    reading = AnswerReading(chunked=False, events=False, request_body=request_for("claude-haiku-4-5"))
    reading.feed(json.dumps({"id": "msg_2", "usage": usage(1000, 100)}).encode())
    assert reading.usage() == usage_from_api("claude-haiku-4-5", usage(1000, 100))


async def test_settled_waits_for_the_calls_still_out_and_tells_each_total() -> None:
    told: list[Usage] = []
    meter = ApiMeter(told.append)
    assert await meter.settled(0.01)

    async def one_call(delay: float, used: dict[str, int]) -> None:
        with meter.call():
            await asyncio.sleep(delay)
            reading = AnswerReading(chunked=False, events=False, request_body=request_for())
            reading.feed(json.dumps({"id": f"msg_{delay}", "usage": used}).encode())
            meter.count(reading)

    calls = [asyncio.create_task(one_call(0.05, usage(100, 10))),
             asyncio.create_task(one_call(0.2, usage(200, 20)))]
    await asyncio.sleep(0.01)
    assert not await meter.settled(0.1), "one call is still out"
    assert await meter.settled(5)
    await asyncio.gather(*calls)
    assert [t.input_tokens for t in told] == [100, 300]
    assert meter.total == usage_from_api(MODEL, usage(100, 10)) + usage_from_api(
        MODEL, usage(200, 20))


async def test_the_proxy_reads_an_answer_to_its_end_after_the_cli_has_gone(
        tmp_path: Path, messages_server: MessagesServer) -> None:
    """A stop kills the CLI while its call is out; the API bills the answer all the same,
    so the proxy reads it to its end and counts it."""
    used = usage(2200, 220)
    # long enough to take several reads: its final usage comes last
    long = tool_reply("Write", {"file_path": "a.txt", "content": "a" * 300_000},
                      model=MODEL, used=used)
    messages_server.script(slow(long, 1.0))
    meter = ApiMeter()
    socket_path = tmp_path / "api.sock"
    async with ModelProxy(socket_path, upstream=messages_server.base_url, meter=meter):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        body = json.dumps({"model": MODEL, "messages": [], "stream": True}).encode()
        writer.write(b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\naccept-encoding: gzip\r\n"
                     + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        for _ in range(500):
            if messages_server.requests:
                break
            await asyncio.sleep(0.01)
        writer.close()  # the CLI is killed while the API generates
        assert not await meter.settled(0.1), "the call is still out"
        assert await meter.settled(10)
    assert meter.total == usage_from_api(MODEL, used)
    assert messages_server.requests[0].headers["accept-encoding"] == "identity"
