"""How much a directive's run has added to its history, as the workflow counts it.

Why not `workflow.info().get_current_history_length()` (or the server's
continue-as-new suggestion): a status query that reads the history between an
activity's result and its workflow task makes SDK Core run the result for the
query (makima/query_guard.py). When the real task brings nothing new, Core
completes it with the commands that activation made, and that activation saw a
shorter history (and the previous task's clock). A checkpoint decided on it could
be decided otherwise on replay, and the directive would be stuck at its next
replay (fuzz seed 396238). What the workflow counts itself is the same in every
replay.

Each thing the run does or receives is counted with the events it makes plus
one workflow task of its own (three events). Tasks batch, so this over-counts a
little: a checkpoint comes somewhat early, never late. Payload bytes are counted
for what can be large (the run's input, each step's input and result, event
batches, goals and plans), against Temporal's limits on a history's size.

The weights below decide when a run checkpoints, so they are part of what replays:
change one (or what is counted) only behind a new `workflow.patched`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Events of one workflow task: scheduled, started, completed.
TASK = 3
#: An activity: scheduled, started, completed (or failed), and the task its result wakes.
ACTIVITY = 3 + TASK
#: A step's run: initiated, started, completed, and the tasks its start and end wake.
CHILD = 3 + 2 * TASK
#: A signal received, and its task.
SIGNAL = 1 + TASK
#: An accepted update: accepted, completed, and its task (a rejected one leaves nothing).
UPDATE = 2 + TASK
#: A signal or a cancel request sent to a step: initiated, delivered, and the task.
SENT = 2 + TASK
#: A timer: started, then fired or cancelled (a fired one also wakes a task: `TASK`).
TIMER = 2
#: A search attribute upsert.
UPSERT = 1


def payload_size(value: Any) -> int:
    """The bytes `value` takes as JSON in the history (pydantic models and plain data)."""
    if value is None:
        return 0
    dump = getattr(value, "model_dump_json", None)
    if dump is not None:
        return len(dump())
    return len(str(value))


@dataclass
class HistoryGauge:
    events: int = 0
    bytes: int = 0
    patches: set[str] = field(default_factory=set)  # whose marker is counted

    def add(self, events: int, payload: Any = None) -> None:
        self.events += events
        self.bytes += payload_size(payload)

    def full(self, max_events: int, max_bytes: int) -> bool:
        return self.events >= max_events or self.bytes >= max_bytes
