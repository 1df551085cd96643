"""Connecting to Temporal from the environment: one place for the worker and the CLI.

TEMPORAL_ADDRESS (default localhost:7233), TEMPORAL_NAMESPACE (default
`default`), TEMPORAL_TLS_CERT / TEMPORAL_TLS_KEY (paths to a client
certificate and key, for mTLS), TEMPORAL_API_KEY (Temporal Cloud API keys;
implies TLS). Every client uses the pydantic data converter.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import TLSConfig

from makima.constants import TASK_QUEUE
from makima.errors import SpecError


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
