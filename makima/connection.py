"""Connecting to Temporal from the environment: one place for the worker and the CLI.

TEMPORAL_ADDRESS (default localhost:7233), TEMPORAL_NAMESPACE (default
`default`), TEMPORAL_TLS_CERT / TEMPORAL_TLS_KEY (paths to a client
certificate and key, for mTLS), TEMPORAL_API_KEY (Temporal Cloud API keys;
implies TLS). Every client uses the pydantic data converter.

A worker may start before its server is ready (in compose, containers start
together): `connect_temporal_when_ready` retries while the server refuses
connections or says it is not serving yet, up to MAKIMA_TEMPORAL_WAIT_SECONDS
(default 120; 0 tries once). Anything else (TLS, a refused API key) fails at
once: waiting would not fix it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from makima.constants import TASK_QUEUE
from makima.errors import MakimaError, SpecError

#: How long a starting worker waits for Temporal by default (seconds).
DEFAULT_TEMPORAL_WAIT_SECONDS = 120.0
#: Longest pause between two tries, and between two "still waiting" lines.
_RETRY_PAUSE_SECONDS = 2.0
_LOG_EVERY_SECONDS = 10.0


class TemporalUnavailable(MakimaError):
    """The Temporal server did not answer within the time a worker waits for it."""


def task_queue() -> str:
    return os.environ.get("MAKIMA_TASK_QUEUE", TASK_QUEUE)


def _tls() -> TLSConfig | bool:
    cert, key = os.environ.get("TEMPORAL_TLS_CERT"), os.environ.get("TEMPORAL_TLS_KEY")
    if bool(cert) != bool(key):
        raise SpecError("set both TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY, or neither")
    if cert and key:
        return TLSConfig(client_cert=Path(cert).read_bytes(),
                         client_private_key=Path(key).read_bytes())
    return bool(os.environ.get("TEMPORAL_API_KEY"))


async def connect_temporal(address: str | None = None, namespace: str | None = None) -> Client:
    return await Client.connect(
        address or os.environ.get("TEMPORAL_ADDRESS", "localhost:7233"),
        namespace=namespace or os.environ.get("TEMPORAL_NAMESPACE", "default"),
        api_key=os.environ.get("TEMPORAL_API_KEY") or None,
        tls=_tls(),
        data_converter=pydantic_data_converter,
    )


def temporal_wait_seconds() -> float:
    text = (os.environ.get("MAKIMA_TEMPORAL_WAIT_SECONDS") or "").strip()
    if not text:
        return DEFAULT_TEMPORAL_WAIT_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"MAKIMA_TEMPORAL_WAIT_SECONDS must be a number of seconds, "
                        f"got {text!r}") from None
    if value < 0:
        raise SpecError(f"MAKIMA_TEMPORAL_WAIT_SECONDS must not be negative, got {text!r}")
    return value


def server_not_ready(err: Exception) -> bool:
    """A server that is down, starting, or not serving yet (worth waiting for)."""
    if "not healthy" in str(err).lower():  # a dev server or frontend still starting
        return True
    if isinstance(err, RPCError):
        return err.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
    return isinstance(err, RuntimeError) and "Failed client connect" in str(err)


async def connect_temporal_when_ready(wait_seconds: float, log: logging.Logger) -> Client:
    """`connect_temporal()`, retried while the server is not ready, for up to
    `wait_seconds`; logs one line when it starts waiting and every few seconds
    after. Raises TemporalUnavailable (with the last error) past the deadline."""
    address = os.environ.get("TEMPORAL_ADDRESS", "localhost:7233")
    deadline = time.monotonic() + wait_seconds
    next_log = 0.0
    while True:
        try:
            return await connect_temporal()
        except (RuntimeError, RPCError) as err:
            if not server_not_ready(err):
                raise
            left = deadline - time.monotonic()
            reason = str(err).splitlines()[0][:300]
            if left <= 0:
                raise TemporalUnavailable(
                    f"Temporal at {address} did not answer within {wait_seconds:g} s "
                    f"(MAKIMA_TEMPORAL_WAIT_SECONDS): {reason}") from None
            if time.monotonic() >= next_log:
                log.warning("makima worker: Temporal at %s is not ready (%s); retrying for "
                            "up to %.0f s more", address, reason, left)
                next_log = time.monotonic() + _LOG_EVERY_SECONDS
            await asyncio.sleep(min(_RETRY_PAUSE_SECONDS, max(left, 0.05)))
