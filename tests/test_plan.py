"""The pure plan: rolling restarts (one replica of a model at a time, never the last healthy
one while another is coming up, never a wait that cannot end), and every other decision
from its inputs: trials and rollbacks, liveness, drains, model readiness, pending changes."""

from __future__ import annotations

from dataclasses import replace

from reconciler.backends.health import Health
from reconciler.drain import wedged_backends
from reconciler.plan import (
    ActionKind,
    DesiredUnit,
    DrainState,
    ObservedUnit,
    Rejected,
    Stopping,
    Trial,
    plan,
)


def replicas(*names: str) -> dict[str, DesiredUnit]:
    return {n: DesiredUnit(n, "new", group="m") for n in names}


def kinds(actions) -> dict[str, ActionKind]:
    return {a.unit: a.kind for a in actions}


def test_a_change_goes_one_replica_at_a_time_while_another_serves():
    desired = replicas("backend-a", "backend-b")
    observed = {n: ObservedUnit(n, "old", True, Health.HEALTHY) for n in desired}
    assert kinds(plan(desired, observed, 0)) == {
        "backend-a": ActionKind.RESTART,
        "backend-b": ActionKind.WAIT,
    }


def test_the_last_healthy_replica_waits_for_the_other_to_come_up():
    desired = replicas("backend-a", "backend-b")
    observed = {
        "backend-a": ObservedUnit("backend-a", "old", True, Health.HEALTHY),
        "backend-b": ObservedUnit("backend-b", "new", True, Health.LOADING),
    }
    [action] = plan(desired, observed, 0)
    assert (
        action.kind is ActionKind.WAIT and "until another replica of m is healthy" in action.reason
    )


def test_with_no_replica_healthy_one_restarts_instead_of_waiting_forever():
    """Nothing serves the model: restarting one replica cannot make that worse, and waiting
    for another to become healthy first would wait for good."""
    desired = replicas("backend-a", "backend-b")
    observed = {n: ObservedUnit(n, "old", True, Health.UNHEALTHY) for n in desired}
    assert kinds(plan(desired, observed, 0)) == {
        "backend-a": ActionKind.RESTART,
        "backend-b": ActionKind.WAIT,
    }


def test_a_replica_refused_by_placement_is_not_waited_for():
    """A refused replica never comes up: the healthy one's change must not wait for it."""
    desired = {
        "backend-a": DesiredUnit("backend-a", "new", group="m"),
        "backend-b": DesiredUnit(
            "backend-b", "", group="m", refused="needs 1 GPU(s); this host has none"
        ),
    }
    observed = {"backend-a": ObservedUnit("backend-a", "old", True, Health.HEALTHY)}
    assert kinds(plan(desired, observed, 0)) == {
        "backend-a": ActionKind.RESTART,
        "backend-b": ActionKind.REFUSE,
    }


# -- everything that decides is an input ---------------------------------------------------
def one(desired: DesiredUnit, seen: ObservedUnit, now: float = 100.0):
    return [(a.kind, a.reason) for a in plan({desired.name: desired}, {seen.name: seen}, now)]


def test_a_change_not_healthy_within_its_timeout_is_rolled_back_and_then_held():
    unit = DesiredUnit("backend-a", "new", health_timeout=30)
    on_trial = ObservedUnit(
        "backend-a", "new", True, Health.LOADING, trial=Trial(50.0, "old"), detail="loading"
    )
    assert one(unit, on_trial, now=79) == []  # still within its 30 s
    [(kind, reason)] = one(unit, on_trial, now=81)
    assert kind is ActionKind.ROLLBACK and "not healthy within 30s (loading: loading)" in reason
    rolled = ObservedUnit(
        "backend-a", "old", True, Health.HEALTHY, rejected=Rejected("new", 400.0, "why")
    )
    [(kind, reason)] = one(unit, rolled, now=100)
    assert kind is ActionKind.WAIT and "rolled back (why); retrying in 300s" in reason
    assert one(unit, rolled, now=401)[0][0] is ActionKind.RESTART  # its backoff is over


def test_a_start_with_nothing_to_roll_back_to_fails_and_a_healthy_one_ends_its_trial():
    unit = DesiredUnit("backend-a", "v1", health_timeout=30)
    new = ObservedUnit("backend-a", "v1", True, Health.DOWN, trial=Trial(0.0, None))
    assert [k for k, _ in one(unit, new)] == [ActionKind.FAIL]
    assert (
        one(unit, ObservedUnit("backend-a", "v1", True, Health.HEALTHY, trial=Trial(0.0, None)))
        == []
    )


def test_a_backend_silent_past_its_liveness_timeout_is_drained_then_restarted():
    unit = DesiredUnit("backend-a", "v1", drain=True, liveness_timeout=10)
    silent = ObservedUnit("backend-a", "v1", True, Health.DOWN, silent_for=11, detail="timed out")
    assert one(unit, ObservedUnit("backend-a", "v1", True, Health.DOWN, silent_for=9)) == []
    [(kind, reason)] = one(unit, silent)
    assert (
        kind is ActionKind.DRAIN
        and "hung: no answer to its probe for 11s (liveness_timeout 10s" in reason
    )
    waiting = ObservedUnit(
        "backend-a", "v1", True, Health.DOWN, silent_for=12, drain=DrainState(False, "1 open")
    )
    assert [k for k, _ in one(unit, waiting)] == [ActionKind.WAIT]
    drained = ObservedUnit(
        "backend-a", "v1", True, Health.DOWN, silent_for=13, drain=DrainState(True, "done")
    )
    assert [k for k, _ in one(unit, drained)] == [ActionKind.RESTART]
    # Never answered since it started: starting up is health_timeout's business, not liveness's.
    assert one(unit, ObservedUnit("backend-a", "v1", True, Health.DOWN, silent_for=None)) == []


def test_a_backend_the_gateway_reports_wedged_is_drained_then_restarted():
    """Issue 14: a llama.cpp slot a cancelled request left busy cannot be erased: the gateway
    reports the backend wedged and the reconciler restarts it, drained first, saying why."""
    unit = DesiredUnit("backend-a", "v1", drain=True, liveness_timeout=10)
    why = "wedged: llama.cpp slot(s) 1 stay busy with no request open"
    [(kind, reason)] = one(unit, ObservedUnit("backend-a", "v1", True, Health.HEALTHY, wedged=why))
    assert kind is ActionKind.DRAIN and reason.startswith(why)
    drained = ObservedUnit(
        "backend-a", "v1", True, Health.HEALTHY, wedged=why, drain=DrainState(True, "done")
    )
    [(kind, reason)] = one(unit, drained)
    assert kind is ActionKind.RESTART and "restarting it" in reason


def test_the_gateways_wedged_report_is_read_per_backend():
    health = {
        "backends": {
            "a": {"healthy": False, "wedged": "wedged: slot 1"},
            "b": {"healthy": True, "wedged": None},
        }
    }
    assert wedged_backends(health) == {"a": "wedged: slot 1"}
    assert (
        wedged_backends("gateway not reachable") == {} and wedged_backends({"backends": []}) == {}
    )


def test_a_drain_no_longer_needed_is_ended():
    unit = DesiredUnit("backend-a", "v1", drain=True)
    seen = ObservedUnit("backend-a", "v1", True, Health.HEALTHY, drain=DrainState(False, "1 open"))
    assert [k for k, _ in one(unit, seen)] == [ActionKind.UNDRAIN]


def test_a_model_not_ready_holds_the_start_and_keeps_the_old_version_running():
    pull = DesiredUnit("backend-a", "v2", model_wait="not there yet: pulling it", model_pull=True)
    assert [k for k, _ in one(pull, ObservedUnit("backend-a", None, False))] == [ActionKind.PULL]
    wait = DesiredUnit("backend-a", "v2", model_wait="pulling m (in the background)")
    [(kind, reason)] = one(wait, ObservedUnit("backend-a", "v1", True, Health.HEALTHY))
    assert kind is ActionKind.WAIT and reason.startswith(
        "settings changed, but the model is not ready"
    )


def test_a_systemd_change_written_but_not_applied_is_restarted():
    """The file already says v2 but v1 runs (a pass was cut short): a restart, not nothing."""
    seen = ObservedUnit("backend-a", "v1", True, Health.HEALTHY, pending=True)
    [(kind, reason)] = one(DesiredUnit("backend-a", "v1"), seen)
    assert kind is ActionKind.RESTART and "not applied" in reason


def test_new_settings_that_crash_in_a_loop_are_rolled_back_too():
    """Down between crashes when a pass looks: its trial still runs out, and the old
    settings come back instead of a restart every backoff, for good."""
    unit = DesiredUnit("backend-a", "new", health_timeout=30)
    crashed = ObservedUnit(
        "backend-a", "new", False, failures=3, retry_at=200.0, trial=Trial(50.0, "old")
    )
    assert [k for k, _ in one(unit, crashed, now=79)] == [ActionKind.WAIT]  # backing off, in time
    assert [k for k, _ in one(unit, crashed, now=81)] == [ActionKind.ROLLBACK]


def test_the_gateway_is_not_restarted_while_it_drains_a_backend():
    """A config change for both (say, another --config path) restarted the gateway in the
    pass the drain began: the drain then had no gateway to ask and stopped the backend
    undrained. The gateway's change waits for the drain."""
    desired = {
        "backend-a": DesiredUnit("backend-a", "v2", drain=True),
        "gateway": DesiredUnit("gateway", "g2", drains_others=True),
    }
    observed = {
        "backend-a": ObservedUnit("backend-a", "v1", True, Health.HEALTHY),
        "gateway": ObservedUnit("gateway", "g1", True, Health.HEALTHY),
    }
    assert kinds(plan(desired, observed, 0)) == {
        "backend-a": ActionKind.DRAIN,
        "gateway": ActionKind.WAIT,
    }
    observed["backend-a"] = ObservedUnit(
        "backend-a", "v1", True, Health.HEALTHY, drain=DrainState(True, "drained")
    )
    assert kinds(plan(desired, observed, 0)) == {
        "backend-a": ActionKind.RESTART,
        "gateway": ActionKind.RESTART,
    }


def test_a_unit_still_stopping_is_waited_for_then_killed_and_stays_drained():
    """A stop is asked for and observed, never waited for in a pass: until its grace is over
    the plan waits (the drain stays: it still runs), then says KILL; its own supervisor's
    escalation (systemd's TimeoutStopSec) is waited for."""
    unit = DesiredUnit("backend-a", "v2", drain=True)
    seen = ObservedUnit("backend-a", "v1", True, drain=DrainState(True, "drained"),
                        stopping=Stopping(since=100.0, kill_at=115.0))  # fmt: skip
    [(kind, reason)] = one(unit, seen, now=105.0)
    assert kind is ActionKind.WAIT and reason == "stopping (asked 5s ago; killed in 10s)"
    [(kind, reason)] = one(unit, seen, now=115.0)
    assert kind is ActionKind.KILL and "did not stop within its grace (asked 15s ago)" in reason
    systemd = replace(seen, stopping=Stopping(0.0, None))
    [(kind, reason)] = one(unit, systemd, now=500.0)
    assert kind is ActionKind.WAIT and "its supervisor kills it" in reason
    # An undeclared unit stopping: the same, no second STOP.
    assert [a.kind for a in plan({}, {"backend-a": seen}, 105.0)] == [ActionKind.WAIT]


def test_a_unit_stopped_for_a_rollback_starts_the_settings_it_was_rolled_back_to():
    """Not the declared ones, which wait out their backoff."""
    unit = DesiredUnit("backend-a", "new")
    seen = ObservedUnit(
        "backend-a", "old", False, rejected=Rejected("new", 400.0, "not healthy within 5s")
    )
    [action] = plan({"backend-a": unit}, {"backend-a": seen}, 100.0)
    assert action.kind is ActionKind.START and action.content == "old"
    assert (
        "rolled back to (not healthy within 5s; the declared ones are retried in 300s)"
        in action.reason
    )
    [later] = plan({"backend-a": unit}, {"backend-a": seen}, 401.0)  # the backoff is over
    assert later.kind is ActionKind.START and later.content == "new"
