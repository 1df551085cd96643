"""Errors of the read model, below `makima.errors.StoreError`:

    StoreError
    ├── NotFound        an unknown directive or step was asked for
    └── InvalidFilter   a read was given a filter value it cannot mean (names the allowed ones)

Both are the caller's mistake: never retried.
"""

from __future__ import annotations

from makima.errors import StoreError


class NotFound(StoreError):
    non_retryable = True


class InvalidFilter(StoreError):
    non_retryable = True


__all__ = ["InvalidFilter", "NotFound", "StoreError"]
