"""The directive context: what every model call about a directive needs to know
(title, goal, requirements, acceptance criteria, constraints, repository),
rendered identically each time so it can be sent as a cached prompt prefix.

Only fields that stay the same for the directive's whole life belong here;
anything per step or per attempt goes after the cache breakpoint, or every
call would write a new cache entry instead of reading the shared one.
"""

from __future__ import annotations

from typing import Any

from makima.contracts import DirectiveContext
from makima.models import DirectiveSpec


def _bullets(items: list[str], empty: str = "(none given)") -> str:
    return "\n".join(f"- {item}" for item in items) if items else empty


def directive_context(spec: DirectiveSpec | DirectiveContext) -> str:
    repo = spec.repository
    return "\n".join([
        "<directive>",
        f"Title: {spec.title}",
        "",
        "Goal:",
        spec.goal.strip(),
        "",
        "Requirements:",
        _bullets(spec.requirements),
        "",
        "Acceptance criteria:",
        _bullets(spec.acceptance_criteria),
        "",
        "Constraints:",
        _bullets(spec.constraints),
        "",
        f"Repository: {repo.location} (base branch {repo.base_branch})",
        "</directive>",
    ])


def cached_context_block(spec: DirectiveSpec | DirectiveContext) -> dict[str, Any]:
    """The directive context as a system block marked as a prompt-cache breakpoint:
    the tools, the instructions before it and the context itself are cached, so
    every evaluation of the directive's steps reads them from the cache."""
    return {
        "type": "text",
        "text": directive_context(spec),
        "cache_control": {"type": "ephemeral"},
    }
