"""Benchmarks: scripts that print numbers (not tests). `make bench` or
`python -m bench --help`. Each scenario runs against a local Temporal dev server
with the `shell` executor, no LLM (supplied plans, programmatic evaluation) and
an embedded Postgres, and measures from Temporal's own history timestamps.
"""
