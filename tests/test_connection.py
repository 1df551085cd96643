"""Which connection failures a starting worker waits out (the server is down or
still starting) and which it reports at once (waiting would not fix them). The
waiting itself, against a real dev server started after the worker, is in
tests/test_faults.py."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError, RPCStatusCode

from makima.connection import server_not_ready, temporal_wait_seconds
from makima.errors import SpecError


@pytest.mark.parametrize(("error", "waits"), [
    (RuntimeError("Failed client connect: Server connection error: tonic::transport::Error("
                  "Transport, ConnectError(\"tcp connect error\", Connection refused))"), True),
    (RPCError("Frontend is not healthy yet", RPCStatusCode.UNAVAILABLE, b""), True),
    (RPCError("Frontend is not healthy yet", RPCStatusCode.INTERNAL, b""), True),
    (RPCError("Request unauthorized.", RPCStatusCode.UNAUTHENTICATED, b""), False),
    (RuntimeError("invalid TLS configuration"), False),
])
def test_only_a_server_that_is_not_ready_is_waited_for(error: Exception, waits: bool) -> None:
    assert server_not_ready(error) is waits


def test_the_wait_is_configured_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_TEMPORAL_WAIT_SECONDS", "45")
    assert temporal_wait_seconds() == 45
    monkeypatch.setenv("MAKIMA_TEMPORAL_WAIT_SECONDS", "soon")
    with pytest.raises(SpecError, match="MAKIMA_TEMPORAL_WAIT_SECONDS must be a number of "
                                        "seconds, got 'soon'"):
        temporal_wait_seconds()
    monkeypatch.setenv("MAKIMA_TEMPORAL_WAIT_SECONDS", "-1")
    with pytest.raises(SpecError, match="must not be negative"):
        temporal_wait_seconds()
