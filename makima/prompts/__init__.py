"""The words makima sends to models, in our own phrasing: the directive context
shared (and prompt-cached) by every call of a directive (context), the planner's
and re-planner's instructions (planning) and the judge's (evaluation). The
rework wording an agent sees lives with its task prompt
(makima.executors.base.task_prompt), its one source.

Pure string building: no I/O, no client."""

from makima.prompts.context import cached_context_block, directive_context
from makima.prompts.evaluation import evaluation_request, evaluation_system
from makima.prompts.planning import planning_request, planning_system

__all__ = [
    "cached_context_block",
    "directive_context",
    "evaluation_request",
    "evaluation_system",
    "planning_request",
    "planning_system",
]
