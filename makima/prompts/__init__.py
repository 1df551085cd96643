"""The words makima sends to models, in our own phrasing: the directive context
shared (and prompt-cached) by every call of a directive (context), the planner's
and re-planner's instructions (planning), the judge's (evaluation), and the
rework prefix an agent sees before its task plan on a new attempt (rework).

Pure string building: no I/O, no client."""

from makima.prompts.context import cached_context_block, directive_context
from makima.prompts.evaluation import evaluation_request, evaluation_system
from makima.prompts.planning import planning_request, planning_system
from makima.prompts.rework import rework_prefix, task_with_rework

__all__ = [
    "cached_context_block",
    "directive_context",
    "evaluation_request",
    "evaluation_system",
    "planning_request",
    "planning_system",
    "rework_prefix",
    "task_with_rework",
]
