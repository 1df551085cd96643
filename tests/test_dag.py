"""Unit and property tests of makima/dag.py: plan validation messages, cycle
paths, the ready frontier, steps to skip, levels, topological order, layout and
the critical path; then hypothesis over random DAGs (the frontier never runs a
step early, every valid DAG drains, every cycle is rejected, a failure skips
exactly its transitive dependants)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from makima.dag import (
    MAX_DEPENDENCIES,
    critical_path_length,
    find_cycle,
    layout,
    levels,
    ready_steps,
    steps_to_revive,
    steps_to_skip,
    topological_order,
    validate_plan,
)
from makima.models import Plan, PlannedStep, StepStatus

PENDING, PASSED, FAILED = StepStatus.PENDING, StepStatus.PASSED, StepStatus.FAILED


def plan_of(graph: Mapping[str, list[str]]) -> Plan:
    """A plan from {name: depends_on}, in the mapping's order."""
    return Plan(steps=[PlannedStep(name=n, depends_on=list(d)) for n, d in graph.items()])


#   a ─┬─ b ─┬─ d ── e
#      └─ c ─┘
#   f (independent)
DIAMOND = plan_of({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"], "f": []})


def assert_real_cycle(path: list[str], graph: Mapping[str, list[str]]) -> None:
    assert len(path) >= 3, path  # at least x -> y -> x (self-loops are reported apart)
    assert path[0] == path[-1]
    assert len(set(path[:-1])) == len(path) - 1, f"the cycle repeats a step: {path}"
    for a, b in zip(path, path[1:], strict=False):
        assert b in graph[a], f"{a} -> {b} is not a dependency in {path}"


# --------------------------------------------------------------------------- validate_plan


def test_valid_plan_has_no_problems() -> None:
    assert validate_plan(DIAMOND) == []


@pytest.mark.parametrize("plan", [None, Plan(), Plan(steps=[])])
def test_empty_plan(plan: Plan | None) -> None:
    assert validate_plan(plan) == ["the plan has no steps: it needs at least one"]


def test_duplicate_name() -> None:
    problems = validate_plan(
        plan_of({"a": []}).model_copy(update={"steps": [PlannedStep(name="a")] * 2})
    )
    assert problems == ["step name 'a' is used more than once"]


@pytest.mark.parametrize("name", ["", "Build", "-lead", "has space", "a/b", "x" * 64, "ünï"])
def test_invalid_name(name: str) -> None:
    problems = validate_plan(Plan(steps=[PlannedStep(name=name)]))
    assert len(problems) == 1
    assert problems[0].startswith(f"step name {name!r} is invalid")


@pytest.mark.parametrize("name", ["a", "0", "build-api_2", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validate_plan(Plan(steps=[PlannedStep(name=name)])) == []


def test_unknown_dependency() -> None:
    assert validate_plan(plan_of({"a": [], "b": ["a", "ghost"]})) == [
        "step 'b' depends on unknown step 'ghost'"
    ]


def test_self_dependency_is_one_message_not_also_a_cycle() -> None:
    assert validate_plan(plan_of({"a": ["a"]})) == ["step 'a' depends on itself"]


def test_two_step_cycle_is_named_with_its_path() -> None:
    problems = validate_plan(plan_of({"a": ["b"], "b": ["a"]}))
    assert problems == ["the plan has a cycle: a -> b -> a"]


def test_longer_cycle_behind_an_entry_step_is_named_without_the_entry() -> None:
    graph = {"start": ["x"], "x": ["y"], "y": ["z"], "z": ["x"]}
    problems = validate_plan(plan_of(graph))
    assert problems == ["the plan has a cycle: x -> y -> z -> x"]


def test_too_many_steps() -> None:
    plan = plan_of({f"s{i}": [] for i in range(4)})
    assert validate_plan(plan, max_steps=3) == ["the plan has 4 steps; at most 3 are allowed"]
    assert validate_plan(plan, max_steps=4) == []


def test_too_many_dependencies() -> None:
    graph: dict[str, list[str]] = {f"s{i}": [] for i in range(MAX_DEPENDENCIES + 1)}
    graph["last"] = list(graph)
    assert validate_plan(plan_of(graph)) == [
        f"step 'last' has {MAX_DEPENDENCIES + 1} dependencies; at most {MAX_DEPENDENCIES} are allowed"
    ]


def test_repeated_dependency() -> None:
    assert validate_plan(plan_of({"a": [], "b": ["a", "a"]})) == [
        "step 'b' lists a dependency more than once"
    ]


def test_every_problem_gets_its_own_message() -> None:
    plan = Plan(
        steps=[
            PlannedStep(name="a", depends_on=["b"]),
            PlannedStep(name="b", depends_on=["a"]),
            PlannedStep(name="Bad"),
            PlannedStep(name="c", depends_on=["c", "nope"]),
            PlannedStep(name="c"),
        ]
    )
    problems = validate_plan(plan)
    assert sorted(problems) == sorted(
        [
            "step name 'Bad' is invalid: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit",
            "step name 'c' is used more than once",
            "step 'c' depends on itself",
            "step 'c' depends on unknown step 'nope'",
            "the plan has a cycle: a -> b -> a",
        ]
    )


def test_kept_steps_may_be_dependencies() -> None:
    plan = plan_of({"new": ["old"]})
    assert validate_plan(plan) == ["step 'new' depends on unknown step 'old'"]
    assert validate_plan(plan, kept=["old"]) == []


# --------------------------------------------------------------------------- find_cycle


def test_find_cycle_none_for_a_dag() -> None:
    assert find_cycle(DIAMOND.steps) is None


def test_find_cycle_ignores_unknown_dependencies() -> None:
    assert find_cycle(plan_of({"a": ["kept"], "b": ["a", "kept"]}).steps) is None


def test_find_cycle_returns_a_real_cycle_path() -> None:
    graph = {"a": [], "b": ["a", "e"], "c": ["b"], "d": ["c"], "e": ["d"], "f": ["e"]}
    path = find_cycle(plan_of(graph).steps)
    assert path is not None
    assert_real_cycle(path, graph)
    assert set(path) == {"b", "c", "d", "e"}


def test_find_cycle_on_a_long_chain_does_not_recurse() -> None:
    n = 5000
    graph = {f"s{i}": [f"s{i + 1}"] for i in range(n)}
    graph[f"s{n}"] = ["s0"]
    path = find_cycle(plan_of(graph).steps)
    assert path is not None and len(path) == n + 2
    assert_real_cycle(path, graph)


# --------------------------------------------------------------------------- frontier and skipping


def test_ready_steps_start_with_the_roots_in_plan_order() -> None:
    assert ready_steps(DIAMOND, {}) == ["a", "f"]


def test_ready_steps_need_every_dependency_passed() -> None:
    statuses = {"a": PASSED, "b": PASSED, "c": StepStatus.RUNNING, "f": PASSED}
    assert ready_steps(DIAMOND, statuses) == []
    statuses["c"] = PASSED
    assert ready_steps(DIAMOND, statuses) == ["d"]


def test_ready_steps_offer_only_pending_steps() -> None:
    statuses = {
        "a": PASSED,
        "b": StepStatus.RUNNING,
        "c": StepStatus.REWORK,
        "f": StepStatus.SKIPPED,
    }
    assert ready_steps(DIAMOND, statuses) == []
    assert ready_steps(DIAMOND, {"a": PASSED, "f": PENDING}) == ["b", "c", "f"]


def test_ready_steps_see_kept_steps_from_an_earlier_generation() -> None:
    plan = plan_of({"new": ["old"]})
    assert ready_steps(plan, {}) == []
    assert ready_steps(plan, {"old": PASSED}) == ["new"]


def test_steps_to_skip_are_transitive_and_in_plan_order() -> None:
    assert steps_to_skip(DIAMOND, {"a": FAILED}) == ["b", "c", "d", "e"]
    assert steps_to_skip(DIAMOND, {"a": PASSED, "c": StepStatus.BLOCKED}) == ["d", "e"]
    assert steps_to_skip(DIAMOND, {"f": StepStatus.CANCELLED}) == []


def test_steps_to_skip_leave_running_and_already_skipped_steps_alone() -> None:
    statuses = {"a": PASSED, "b": FAILED, "c": PASSED, "d": StepStatus.SKIPPED}
    # d is already skipped; e is the one that remains to be skipped
    assert steps_to_skip(DIAMOND, statuses) == ["e"]
    statuses = {"a": PASSED, "b": FAILED, "c": PASSED, "d": StepStatus.RUNNING}
    assert steps_to_skip(DIAMOND, statuses) == []


def test_skipped_steps_are_revived_once_no_dependency_holds_them_back() -> None:
    skipped = dict.fromkeys("bcde", StepStatus.SKIPPED)
    # a failed, and is re-evaluated: everything it held back may run again
    assert steps_to_revive(DIAMOND, {"a": StepStatus.EVALUATING, **skipped}) == ["b", "c", "d", "e"]
    # c failed too: b is free, d and e still wait on c
    assert steps_to_revive(DIAMOND, {"a": PASSED, "c": FAILED, "b": StepStatus.SKIPPED,
                                     "d": StepStatus.SKIPPED, "e": StepStatus.SKIPPED}) == ["b"]
    assert steps_to_revive(DIAMOND, {"a": FAILED, **skipped}) == []


def test_nothing_to_skip_while_all_is_well() -> None:
    assert steps_to_skip(DIAMOND, {}) == []
    assert steps_to_skip(DIAMOND, dict.fromkeys(DIAMOND.names, PASSED)) == []


# --------------------------------------------------------------------------- levels, order, layout


def test_levels() -> None:
    assert levels(DIAMOND) == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3, "f": 0}


def test_levels_ignore_kept_dependencies() -> None:
    assert levels(plan_of({"new": ["old"], "next": ["new"]})) == {"new": 0, "next": 1}


def test_topological_order_keeps_plan_order_for_ties() -> None:
    assert topological_order(DIAMOND) == ["a", "f", "b", "c", "d", "e"]
    reversed_plan = plan_of({"e": ["d"], "d": ["b", "c"], "c": ["a"], "b": ["a"], "a": []})
    assert topological_order(reversed_plan) == ["a", "c", "b", "d", "e"]


def test_topological_order_refuses_a_cycle_naming_it() -> None:
    with pytest.raises(ValueError, match="the plan has a cycle: a -> b -> a"):
        topological_order(plan_of({"a": ["b"], "b": ["a"]}))


def test_layout_layers_are_levels_and_rows_are_unique() -> None:
    positions = layout(DIAMOND)
    level = levels(DIAMOND)
    assert {n: p.layer for n, p in positions.items()} == level
    assert positions["a"].row == 0 and positions["f"].row == 1
    assert {positions["b"].row, positions["c"].row} == {0, 1}
    assert positions["d"].row == 0 and positions["e"].row == 0


def test_layout_puts_a_child_next_to_its_parent() -> None:
    # two chains given interleaved: the barycenter keeps each child in its parent's row
    plan = plan_of({"p": [], "q": [], "q2": ["q"], "p2": ["p"]})
    positions = layout(plan)
    assert positions["p2"].row == positions["p"].row
    assert positions["q2"].row == positions["q"].row


def test_critical_path_length() -> None:
    durations = {"a": 1.0, "b": 5.0, "c": 2.0, "d": 1.0, "e": 1.0, "f": 7.5}
    assert critical_path_length(DIAMOND, durations) == 8.0  # a, b, d, e
    durations["f"] = 9.0
    assert critical_path_length(DIAMOND, durations) == 9.0
    assert critical_path_length(DIAMOND, {}) == 0.0


# --------------------------------------------------------------------------- properties over random DAGs


@st.composite
def dags(draw: st.DrawFn, min_size: int = 1, max_size: int = 14) -> Plan:
    """A random DAG: a step may depend only on earlier steps (so no cycle), then
    the plan order is shuffled so order never hides a bug."""
    n = draw(st.integers(min_size, max_size))
    names = [f"s{i}" for i in range(n)]
    graph = {
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=4)) if i else []
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))
    return plan_of({name: graph[name] for name in order})


def deps_of(plan: Plan) -> dict[str, list[str]]:
    return {s.name: s.depends_on for s in plan.steps}


def dependants_of(plan: Plan, failed: str) -> set[str]:
    """Every step that reaches `failed` through dependencies (by breadth-first search)."""
    found: set[str] = set()
    frontier = [failed]
    while frontier:
        current = frontier.pop()
        for step in plan.steps:
            if current in step.depends_on and step.name not in found:
                found.add(step.name)
                frontier.append(step.name)
    return found


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


@PROPERTY_SETTINGS
@given(dags())
def test_random_dags_are_valid(plan: Plan) -> None:
    assert validate_plan(plan) == []
    assert find_cycle(plan.steps) is None
    order = topological_order(plan)
    assert sorted(order) == sorted(plan.names)
    index = {n: i for i, n in enumerate(order)}
    for step in plan.steps:
        assert all(index[d] < index[step.name] for d in step.depends_on)


@PROPERTY_SETTINGS
@given(dags(), st.randoms(use_true_random=False))
def test_frontier_never_offers_a_step_before_its_dependencies_passed(plan: Plan, rnd) -> None:
    """Run the DAG finishing one random ready step at a time (any interleaving)."""
    deps = deps_of(plan)
    statuses: dict[str, StepStatus] = {}
    running: list[str] = []
    while True:
        for name in ready_steps(plan, statuses):
            assert all(statuses.get(d) == PASSED for d in deps[name]), name
            assert statuses.get(name, PENDING) == PENDING
            statuses[name] = StepStatus.RUNNING
            running.append(name)
        if not running:
            break
        finished = running.pop(rnd.randrange(len(running)))
        statuses[finished] = PASSED
    assert all(statuses.get(n) == PASSED for n in plan.names)


@PROPERTY_SETTINGS
@given(dags())
def test_every_valid_dag_drains_level_by_level(plan: Plan) -> None:
    level = levels(plan)
    statuses: dict[str, StepStatus] = {}
    rounds = 0
    while ready := ready_steps(plan, statuses):
        # with equal step times, round k runs exactly the steps of level k
        assert sorted(ready) == sorted(n for n, lv in level.items() if lv == rounds)
        statuses.update(dict.fromkeys(ready, PASSED))
        rounds += 1
        assert rounds <= len(level)
    assert all(statuses.get(n) == PASSED for n in plan.names)
    assert rounds == max(level.values()) + 1
    assert steps_to_skip(plan, statuses) == []


@PROPERTY_SETTINGS
@given(dags(), st.data())
def test_layout_is_consistent(plan: Plan, data: st.DataObject) -> None:
    level = levels(plan)
    positions = layout(plan)
    assert set(positions) == set(plan.names)
    for name, step in zip(plan.names, plan.steps, strict=True):
        assert positions[name].layer == level[name]
        assert all(level[d] < level[name] for d in step.depends_on)
        if step.depends_on:
            assert level[name] == 1 + max(level[d] for d in step.depends_on)
    by_layer: dict[int, list[int]] = {}
    for pos in positions.values():
        by_layer.setdefault(pos.layer, []).append(pos.row)
    for rows in by_layer.values():
        assert sorted(rows) == list(range(len(rows)))  # unique and compact
    # the critical path with unit durations is the number of levels
    assert critical_path_length(plan, dict.fromkeys(plan.names, 1.0)) == max(level.values()) + 1


@PROPERTY_SETTINGS
@given(dags(min_size=2), st.data())
def test_every_cycle_is_rejected(plan: Plan, data: st.DataObject) -> None:
    """Make an earlier step (in dependency order) depend on a later one that
    reaches it: that closes a cycle, which validation must name."""
    deps = deps_of(plan)
    order = topological_order(plan)
    # pick a step with dependants, then one of its (transitive) dependants
    candidates = [n for n in order if dependants_of(plan, n)]
    if not candidates:
        # no edges at all: link two steps both ways
        first, second = order[0], order[1]
        deps[second] = [first]
    else:
        first = data.draw(st.sampled_from(candidates))
        second = data.draw(st.sampled_from(sorted(dependants_of(plan, first))))
    deps[first] = [*deps[first], second]
    cyclic = plan_of({n: deps[n] for n in plan.names})

    problems = validate_plan(cyclic)
    cycle_messages = [p for p in problems if p.startswith("the plan has a cycle: ")]
    assert len(cycle_messages) == 1, problems
    assert len(problems) == 1, problems
    path = find_cycle(cyclic.steps)
    assert path is not None
    assert_real_cycle(path, deps)
    assert cycle_messages[0] == "the plan has a cycle: " + " -> ".join(path)
    with pytest.raises(ValueError):
        topological_order(cyclic)


@PROPERTY_SETTINGS
@given(dags(), st.data())
def test_a_failure_skips_exactly_its_transitive_dependants(plan: Plan, data: st.DataObject) -> None:
    failed = data.draw(st.sampled_from(plan.names))
    # everything the failed step does not need has passed; it has failed
    needed = set(topological_order(plan))
    statuses = {n: PASSED for n in needed if n != failed and n not in dependants_of(plan, failed)}
    statuses[failed] = FAILED
    expected = dependants_of(plan, failed)
    skipped = steps_to_skip(plan, statuses)
    assert set(skipped) == expected
    assert skipped == [n for n in plan.names if n in expected]  # plan order
    statuses.update(dict.fromkeys(skipped, StepStatus.SKIPPED))
    assert ready_steps(plan, statuses) == []
    assert steps_to_skip(plan, statuses) == []


@PROPERTY_SETTINGS
@given(dags(), st.data())
def test_a_failure_midway_skips_only_pending_dependants(plan: Plan, data: st.DataObject) -> None:
    """Fail a step while others are still pending: only its pending transitive
    dependants are skipped, and the rest of the DAG can still drain."""
    failed = data.draw(st.sampled_from(plan.names))
    statuses: dict[str, StepStatus] = {}
    while failed not in (ready := ready_steps(plan, statuses)):
        statuses.update(dict.fromkeys(ready, PASSED))
    statuses[failed] = FAILED
    doomed = dependants_of(plan, failed)
    skipped = steps_to_skip(plan, statuses)
    assert set(skipped) == doomed
    statuses.update(dict.fromkeys(skipped, StepStatus.SKIPPED))
    while ready := ready_steps(plan, statuses):
        assert not set(ready) & doomed
        statuses.update(dict.fromkeys(ready, PASSED))
    assert {n for n, s in statuses.items() if s == PASSED} == set(plan.names) - doomed - {failed}
