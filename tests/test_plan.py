"""The plan's rolling restarts: one replica of a model at a time, never the last healthy one
while another is coming up, and never a wait that cannot end."""

from __future__ import annotations

from reconciler.backends.health import Health
from reconciler.plan import ActionKind, DesiredUnit, ObservedUnit, plan


def replicas(*names: str) -> dict[str, DesiredUnit]:
    return {n: DesiredUnit(n, "new", group="m") for n in names}


def kinds(actions) -> dict[str, ActionKind]:
    return {a.unit: a.kind for a in actions}


def test_a_change_goes_one_replica_at_a_time_while_another_serves():
    desired = replicas("backend-a", "backend-b")
    observed = {n: ObservedUnit(n, "old", True, Health.HEALTHY) for n in desired}
    assert kinds(plan(desired, observed, 0)) == {"backend-a": ActionKind.RESTART, "backend-b": ActionKind.WAIT}


def test_the_last_healthy_replica_waits_for_the_other_to_come_up():
    desired = replicas("backend-a", "backend-b")
    observed = {
        "backend-a": ObservedUnit("backend-a", "old", True, Health.HEALTHY),
        "backend-b": ObservedUnit("backend-b", "new", True, Health.LOADING),
    }
    [action] = plan(desired, observed, 0)
    assert action.kind is ActionKind.WAIT and "until another replica of m is healthy" in action.reason


def test_with_no_replica_healthy_one_restarts_instead_of_waiting_forever():
    """Nothing serves the model: restarting one replica cannot make that worse, and waiting
    for another to become healthy first would wait for good."""
    desired = replicas("backend-a", "backend-b")
    observed = {n: ObservedUnit(n, "old", True, Health.UNHEALTHY) for n in desired}
    assert kinds(plan(desired, observed, 0)) == {"backend-a": ActionKind.RESTART, "backend-b": ActionKind.WAIT}


def test_a_replica_refused_by_placement_is_not_waited_for():
    """A refused replica never comes up: the healthy one's change must not wait for it."""
    desired = {
        "backend-a": DesiredUnit("backend-a", "new", group="m"),
        "backend-b": DesiredUnit("backend-b", "", group="m", refused="needs 1 GPU(s); this host has none"),
    }
    observed = {"backend-a": ObservedUnit("backend-a", "old", True, Health.HEALTHY)}
    assert kinds(plan(desired, observed, 0)) == {"backend-a": ActionKind.RESTART, "backend-b": ActionKind.REFUSE}
