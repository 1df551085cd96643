"""What sits between one step's agent and the next one's: no worktree cleanup
(the merge removes the worktrees, tests/test_routing.py) and no wait for the
step's last events to be written: a step hands them to its directive, which
records them after the dependants started. The real Temporal test server with
stand-in activities."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from makima.models import DirectiveStatus
from tests.standins import StandIns, spec_of, start
from worker import build_worker


async def test_dependants_start_while_a_steps_own_records_are_stuck_and_nothing_is_lost(
        client: Client, task_queue: str) -> None:
    # every batch a step sends itself hangs (a slow or unreachable Postgres); the
    # chain still runs through, and its directive writes each step's events
    stand = StandIns(hold_step_records=True)
    spec = spec_of(("a", []), ("b", ["a"]), ("c", ["b"]), autonomy="full_auto")
    try:
        async with build_worker(client, task_queue, stand.activities()):
            handle = await start(client, task_queue, spec)
            result = await asyncio.wait_for(handle.result(), 60)
            stand.hold_step_records = False  # let the abandoned batches end
    finally:
        stand.hold_step_records = False

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed"] * 3
    for name in ("a", "b", "c"):
        source = f"{handle.id}/g1/{name}"
        # the directive wrote all of them (the step's own batches were stuck)
        seqs = {e.seq for by, e in stand.recorded_by if e.source == source and by == handle.id}
        assert seqs and seqs == set(range(1, max(seqs) + 1)), f"{name} lost events: {seqs}"
        assert any(e.type.value == "merged" for _, e in stand.recorded_by if e.source == source)
