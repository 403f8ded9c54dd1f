"""The reconciler's diff: a pure function from (desired, observed) to ordered actions.

No process, file or network is touched here; drivers carry the actions out. Each action says
why, which is what `tensorforge plan` prints and what an operator reads when something does
not start."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.backends.health import Health


@dataclass(frozen=True)
class DesiredUnit:
    """One thing that should run: a backend or the gateway, as its driver will install it."""

    name: str
    content: str  # the rendered unit file (systemd) or launch description (process)
    group: str = ""  # replicas of one model share a group: they restart one at a time
    refused: str | None = None  # placement said no: do not start, say why


@dataclass(frozen=True)
class ObservedUnit:
    name: str
    content: str | None  # what is installed now; None if nothing is
    active: bool
    health: Health | None = None
    failures: int = 0  # consecutive failed starts, for backoff
    retry_at: float = 0.0  # do not start again before this time (backoff)


class ActionKind(enum.StrEnum):
    STOP = "stop"
    START = "start"
    RESTART = "restart"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    unit: str
    reason: str
    diff: str = ""

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
    """Stops first (they free ports and GPU memory), then starts, then rolling restarts."""
    stops: list[Action] = []
    starts: list[Action] = []
    restarts: list[Action] = []

    for name in sorted(set(observed) - set(desired)):
        seen = observed[name]
        stops.append(
            Action(
                ActionKind.STOP,
                name,
                "no longer declared" + ("" if seen.active else " (already stopped; remove it)"),
                unit_diff(name, seen.content, None),
            )
        )

    for name in sorted(desired):
        unit = desired[name]
        seen = observed.get(name)
        if unit.refused:
            if seen is not None and seen.active:
                stops.append(Action(ActionKind.STOP, name, f"cannot be placed: {unit.refused}"))
            else:
                starts.append(Action(ActionKind.REFUSE, name, unit.refused))
            continue
        if seen is None or seen.content is None:
            starts.append(
                Action(ActionKind.START, name, "declared but not installed", unit_diff(name, None, unit.content))
            )
        elif not seen.active:
            if seen.retry_at > now:
                starts.append(
                    Action(
                        ActionKind.WAIT,
                        name,
                        f"down after {seen.failures} failed start(s); "
                        f"retrying in {seen.retry_at - now:.1f}s",
                    )
                )
                continue
            changed = seen.content != unit.content
            reason = "settings changed and not running" if changed else "not running"
            if seen.failures:
                reason += f" (attempt {seen.failures + 1})"
            starts.append(
                Action(ActionKind.START, name, reason, unit_diff(name, seen.content, unit.content))
            )
        elif seen.content != unit.content:
            restarts.append(
                Action(
                    ActionKind.RESTART,
                    name,
                    "settings changed",
                    unit_diff(name, seen.content, unit.content),
                )
            )

    return stops + starts + _rolling(restarts, desired, observed)


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
        group = desired[action.unit].group or action.unit
        # A replica placement refused never comes up: it is no member to wait for.
        members = [n for n, u in desired.items() if (u.group or n) == group and not u.refused]
        healthy = [
            n for n in members if n in observed and observed[n].health is Health.HEALTHY
        ]
        others_healthy = [n for n in healthy if n != action.unit]
        if group in busy_groups:
            result.append(
                Action(ActionKind.WAIT, action.unit, f"waiting: another replica of {group} restarts first")
            )
            continue
        if len(members) > 1 and not others_healthy and action.unit in healthy:
            result.append(
                Action(
                    ActionKind.WAIT,
                    action.unit,
                    f"settings changed; waiting until another replica of {group} is healthy",
                    action.diff,
                )
            )
            busy_groups.add(group)
            continue
        busy_groups.add(group)
        result.append(action)
    return result
