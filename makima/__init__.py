"""makima: hand a goal to a fleet of coding agents and get back finished, verified work.

The pure core (models, contracts, dag, policy, constants) is importable from
workflow code; the I/O modules (llm, git, executors, store, devstack) are not.
"""
