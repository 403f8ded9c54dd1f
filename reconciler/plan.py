"""The reconciler's diff: a pure function from (desired, observed) to ordered actions.

No process, file or network is touched here; drivers carry the actions out. Everything that
decides is an input: a unit's start backoff, a change on trial and the settings rolled back,
a systemd change written but not applied, the gateway's drain of a backend, its model's
readiness and whether it still answers its probe. So `tensorforge plan` is exactly what a
pass of `apply` does on the same inputs. Each action says why, which is what `plan` prints
and what an operator reads when something does not start."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

from reconciler.backends.backend_health import Health


@dataclass(frozen=True)
class DesiredUnit:
    """One thing that should run: a backend or the gateway, as its driver will install it."""

    name: str
    content: str  # the rendered unit file (systemd) or launch description (process)
    group: str = ""  # replicas of one model share a group: they restart one at a time
    refused: str | None = None  # placement said no: do not start, say why
    model_wait: str | None = None  # its model is not ready: why (None: ready)
    model_pull: bool = False  # with model_wait: a pull should be started for it
    drain: bool = False  # a gateway routes to it: take it out of routing before stopping it
    drains_others: bool = False  # the gateway: not restarted while it drains a backend
    health_timeout: float = 180.0  # a (re)start not healthy by then is rolled back or failed
    liveness_timeout: float | None = None  # running but silent this long: restart it
    restart_requested: str | None = None  # an operator asked for a fresh process: why, by whom
    drain_requested: str | None = None  # an operator asked to keep it out of routing: why


@dataclass(frozen=True)
class Trial:
    """A (re)start not yet seen healthy."""

    since: float
    previous: str | None  # what ran before the change (None: nothing)


@dataclass(frozen=True)
class Rejected:
    """Settings rolled back recently: not tried again before `until`."""

    content: str
    until: float
    reason: str


@dataclass(frozen=True)
class DrainState:
    """The gateway's drain of a backend, as observed this pass."""

    drained: bool  # it may be stopped now
    detail: str


@dataclass(frozen=True)
class Stopping:
    """A stop under way (asked for, the process not yet gone): observed, never waited for."""

    since: float  # when it was asked to stop (0: not known, e.g. stopped by someone else)
    kill_at: float | None  # when the plan escalates to SIGKILL; None: its supervisor does


@dataclass(frozen=True)
class ObservedUnit:
    name: str
    content: str | None  # what runs now (the settings it was started with); None if nothing
    active: bool
    health: Health | None = None
    failures: int = 0  # consecutive failed starts, for backoff
    retry_at: float = 0.0  # do not start again before this time (backoff)
    pending: bool = False  # new settings were installed but the unit not restarted with them
    gpus: tuple[int, ...] = ()  # the GPUs it was started on
    trial: Trial | None = None
    rejected: Rejected | None = None
    silent_for: float | None = None  # seconds without an answer to its probe, having answered
    drain: DrainState | None = None  # a drain mark exists for it
    wedged: str | None = None  # the gateway reports a slot it cannot free: why
    stopping: Stopping | None = None  # a stop (or restart) under way: wait for it, or kill
    detail: str = ""  # its probe's last word


_DRAINING = "; draining: "  # how a WAIT held for a drain says so


class ActionKind(enum.StrEnum):
    STOP = "stop"  # ask it to stop (SIGTERM, `systemctl stop --no-block`); observed next pass
    KILL = "kill"  # a stop not done within its grace: SIGKILL
    START = "start"
    RESTART = "restart"
    ROLLBACK = "rollback"  # a change not healthy in time: the previous settings again
    FAIL = "fail"  # a start not healthy in time, nothing to roll back to: counted, backed off
    DRAIN = "drain"  # mark it for the gateway to route away; the stop follows once drained
    UNDRAIN = "undrain"  # a drain no longer needed: route to it again
    PULL = "pull"  # fetch its model off the pass; the start follows once it is there
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    unit: str
    reason: str
    diff: str = ""
    content: str | None = None  # the settings a START, RESTART or ROLLBACK runs

    def __str__(self) -> str:
        return f"{self.kind.value:8} {self.unit}: {self.reason}"


def unit_diff(name: str, old: str | None, new: str | None) -> str:
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        fromfile=f"a/{name}" if old is not None else "/dev/null",
        tofile=f"b/{name}" if new is not None else "/dev/null",
    )
    return "".join(lines)


def plan(
    desired: Mapping[str, DesiredUnit],
    observed: Mapping[str, ObservedUnit],
    now: float,
) -> list[Action]:
    """Stops first (they free ports and GPU memory), then starts, then rolling restarts; a
    stop or restart of a unit the gateway routes to is held until it is drained."""
    stops: list[Action] = []
    starts: list[Action] = []
    restarts: list[Action] = []

    # A unit still stopping is left to finish (or killed past its grace) before anything else.
    in_flux = {n for n, seen in observed.items() if seen.stopping is not None}
    for name in sorted(in_flux):
        stops.append(_still_stopping(name, observed[name].stopping, now))  # type: ignore[arg-type]

    for name in sorted(set(observed) - set(desired) - in_flux):
        gone = observed[name]
        stops.append(
            Action(
                ActionKind.STOP,
                name,
                "no longer declared" + ("" if gone.active else " (already stopped; remove it)"),
                unit_diff(name, gone.content, None),
            )
        )

    for name in sorted(set(desired) - in_flux):
        unit = desired[name]
        seen = observed.get(name)
        if unit.refused:
            if seen is not None and seen.active:
                stops.append(Action(ActionKind.STOP, name, f"cannot be placed: {unit.refused}"))
            else:
                starts.append(Action(ActionKind.REFUSE, name, unit.refused))
            continue
        if seen is None or seen.content is None:
            starts.append(_start(unit, None, "declared but not installed"))
        elif (overdue := _overdue_trial(unit, seen, now)) is not None:
            starts.append(
                overdue
            )  # running or not: a crash loop of new settings is rolled back too
        elif not seen.active:
            starts.append(_restart_stopped(unit, seen, now))
        elif (silent := _silent(unit, seen)) is not None:
            restarts.append(Action(ActionKind.RESTART, name, silent, content=unit.content))
        elif seen.wedged:
            reason = f"{seen.wedged}; restarting it"
            restarts.append(Action(ActionKind.RESTART, name, reason, content=unit.content))
        elif seen.pending or seen.content != unit.content:
            restarts.append(_change(unit, seen, now))
        elif unit.restart_requested:
            reason = unit.restart_requested
            restarts.append(Action(ActionKind.RESTART, name, reason, content=unit.content))

    ordered = stops + starts + _rolling(restarts, desired, observed)
    stopping = in_flux | {
        a.unit
        for a in ordered
        if a.kind in (ActionKind.STOP, ActionKind.RESTART) and _runs(observed.get(a.unit))
    }
    held_out = {n for n, u in desired.items() if u.drain and u.drain_requested}
    undrains = [
        Action(ActionKind.UNDRAIN, name, "no stop planned any more: routed to again")
        for name, seen in sorted(observed.items())
        if seen.drain is not None and name not in stopping and name not in held_out
    ]
    gated = [_through_drain(a, desired, observed) for a in ordered]
    return (
        _gateway_after_drains(gated + _operator_drains(desired, observed, stopping), desired)
        + undrains
    )


def _runs(seen: ObservedUnit | None) -> bool:
    return seen is not None and seen.active


def _still_stopping(name: str, stopping: Stopping, now: float) -> Action:
    asked = f" {now - stopping.since:.0f}s ago" if stopping.since else ""
    if stopping.kill_at is None:
        reason = f"stopping (asked{asked}; its supervisor kills it past its stop timeout)"
        return Action(ActionKind.WAIT, name, reason)
    if now >= stopping.kill_at:
        reason = f"did not stop within its grace (asked{asked}); killing it"
        return Action(ActionKind.KILL, name, reason)
    reason = f"stopping (asked{asked}; killed in {stopping.kill_at - now:.0f}s)"
    return Action(ActionKind.WAIT, name, reason)


def _operator_drains(
    desired: Mapping[str, DesiredUnit], observed: Mapping[str, ObservedUnit], stopping: set[str]
) -> list[Action]:
    """Running units an operator asked to take out of routing, not yet marked: mark them.
    They keep running (nothing is stopped) until the request is withdrawn."""
    drains = []
    for name, unit in sorted(desired.items()):
        seen = observed.get(name)
        if not (unit.drain and unit.drain_requested) or name in stopping:
            continue
        if seen is not None and seen.active and seen.drain is None:
            drains.append(Action(ActionKind.DRAIN, name, unit.drain_requested))
    return drains


def _start(unit: DesiredUnit, seen: ObservedUnit | None, reason: str) -> Action:
    if unit.model_wait:
        kind = ActionKind.PULL if unit.model_pull else ActionKind.WAIT
        return Action(kind, unit.name, f"{reason}, but its model is not ready: {unit.model_wait}")
    old = seen.content if seen else None
    diff = unit_diff(unit.name, old, unit.content)
    return Action(ActionKind.START, unit.name, reason, diff, unit.content)


def _restart_stopped(unit: DesiredUnit, seen: ObservedUnit, now: float) -> Action:
    if seen.retry_at > now:
        return Action(
            ActionKind.WAIT,
            unit.name,
            f"down after {seen.failures} failed start(s); retrying in {seen.retry_at - now:.1f}s",
        )
    rejected = seen.rejected
    changed = seen.content != unit.content
    if changed and rejected and rejected.content == unit.content and rejected.until > now:
        # Stopped for a rollback (or crashed after it): what it was rolled back to, not the
        # settings waiting out their backoff.
        reason = (
            f"not running; starting the settings it was rolled back to ({rejected.reason}; "
            f"the declared ones are retried in {rejected.until - now:.0f}s)"
        )
        return Action(ActionKind.START, unit.name, reason, "", seen.content)
    reason = "settings changed and not running" if changed else "not running"
    if seen.failures:
        reason += f" (attempt {seen.failures + 1})"
    return _start(unit, seen, reason)


def _overdue_trial(unit: DesiredUnit, seen: ObservedUnit, now: float) -> Action | None:
    """A (re)start not healthy within its health_timeout: back to the settings that ran
    before, or (nothing to go back to) a failed start, counted for backoff."""
    trial = seen.trial
    if trial is None or seen.health is Health.HEALTHY or now - trial.since < unit.health_timeout:
        return None
    why = f"not healthy within {unit.health_timeout:g}s ({seen.health or 'unknown'}: {seen.detail})"
    if trial.previous is not None and trial.previous != seen.content:
        return Action(
            ActionKind.ROLLBACK,
            unit.name,
            f"{why}; restoring the previous settings",
            unit_diff(unit.name, seen.content, trial.previous),
            trial.previous,
        )
    return Action(ActionKind.FAIL, unit.name, why)


def _silent(unit: DesiredUnit, seen: ObservedUnit) -> str | None:
    """Liveness by responsiveness: a process that exists but has stopped answering."""
    limit = unit.liveness_timeout
    if limit is None or seen.silent_for is None or seen.silent_for <= limit:
        return None
    return (
        f"hung: no answer to its probe for {seen.silent_for:.0f}s "
        f"(liveness_timeout {limit:g}s; {seen.detail or 'no answer'}); restarting it"
    )


def _change(unit: DesiredUnit, seen: ObservedUnit, now: float) -> Action:
    diff = unit_diff(unit.name, seen.content, unit.content)
    rejected = seen.rejected
    if rejected and rejected.content == unit.content and rejected.until > now:
        return Action(
            ActionKind.WAIT,
            unit.name,
            f"settings changed, but they were rolled back ({rejected.reason}); "
            f"retrying in {rejected.until - now:.0f}s",
            diff,
        )
    if unit.model_wait:
        # The new version cannot start: keep the old one running and routed.
        kind = ActionKind.PULL if unit.model_pull else ActionKind.WAIT
        return Action(
            kind,
            unit.name,
            f"settings changed, but the model is not ready: {unit.model_wait}",
            diff,
        )
    reason = (
        "settings installed but not applied (a pass was cut short)"
        if seen.pending
        else "settings changed"
    )
    return Action(ActionKind.RESTART, unit.name, reason, diff, unit.content)


def _rolling(
    restarts: list[Action],
    desired: Mapping[str, DesiredUnit],
    observed: Mapping[str, ObservedUnit],
) -> list[Action]:
    """Restart one replica per group at a time, and never the last healthy one of a group
    while another member is still coming up. When no replica is healthy, restarting one takes
    nothing away: it goes ahead (waiting would wait for good)."""
    result: list[Action] = []
    busy_groups: set[str] = set()
    for action in restarts:
        if action.kind is not ActionKind.RESTART:
            result.append(action)  # held for its model or a rollback: it restarts nothing
            continue
        group = desired[action.unit].group or action.unit
        # A replica placement refused never comes up: it is no member to wait for.
        members = [n for n, u in desired.items() if (u.group or n) == group and not u.refused]
        healthy = [n for n in members if n in observed and observed[n].health is Health.HEALTHY]
        others_healthy = [n for n in healthy if n != action.unit]
        if group in busy_groups:
            result.append(
                Action(
                    ActionKind.WAIT,
                    action.unit,
                    f"waiting: another replica of {group} restarts first",
                )
            )
            continue
        if len(members) > 1 and not others_healthy and action.unit in healthy:
            result.append(
                Action(
                    ActionKind.WAIT,
                    action.unit,
                    f"{action.reason}; waiting until another replica of {group} is healthy",
                    action.diff,
                )
            )
            busy_groups.add(group)
            continue
        busy_groups.add(group)
        result.append(action)
    return result


def _through_drain(
    action: Action, desired: Mapping[str, DesiredUnit], observed: Mapping[str, ObservedUnit]
) -> Action:
    """A stop or restart of a running unit the gateway routes to waits for its drain: marked
    first (DRAIN), held (WAIT, saying what is open) until the gateway has routed away."""
    unit, seen = desired.get(action.unit), observed.get(action.unit)
    if action.kind not in (ActionKind.STOP, ActionKind.RESTART) or unit is None or not unit.drain:
        return action
    if seen is None or not seen.active:
        return action  # nothing runs: nothing to drain
    if seen.drain is None:
        reason = f"{action.reason}; taking it out of the gateway's routing first"
        return Action(ActionKind.DRAIN, action.unit, reason, action.diff)
    if not seen.drain.drained:
        reason = f"{action.reason}{_DRAINING}{seen.drain.detail}"
        return Action(ActionKind.WAIT, action.unit, reason, action.diff)
    return replace(action, reason=f"{action.reason}; {seen.drain.detail}")


def _gateway_after_drains(
    actions: list[Action], desired: Mapping[str, DesiredUnit]
) -> list[Action]:
    """The gateway does the draining: restarting it meanwhile would leave a drain without
    anyone to ask (and the backend stopped undrained). Its change waits for the drains."""
    draining = [a.unit for a in actions if a.kind is ActionKind.DRAIN or _DRAINING in a.reason]
    if not draining:
        return actions
    held = []
    for action in actions:
        unit = desired.get(action.unit)
        if (
            unit is not None
            and unit.drains_others
            and action.kind in (ActionKind.RESTART, ActionKind.STOP)
        ):
            reason = f"{action.reason}; waiting until the drain of {', '.join(draining)} ends"
            action = Action(ActionKind.WAIT, action.unit, reason, action.diff)
        held.append(action)
    return held
