"""What `tensorforge status` and the reconciler's metrics show: one view per unit, built after
each pass from what the driver records, what the probes said and why the plan held a unit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.backends.backend_health import BackendHealth, Health
from reconciler.config.schema import DesiredState
from reconciler.drivers.protocol import UnitRecordLike
from reconciler.plan import Action, ActionKind

GATEWAY_UNIT = "gateway"
# Actions that say why a unit is not (yet) as declared, shown as its detail.
_HOLDS = (
    ActionKind.WAIT,
    ActionKind.PULL,
    ActionKind.DRAIN,
    ActionKind.ROLLBACK,
    ActionKind.FAIL,
    ActionKind.KILL,
)


def backend_unit(name: str) -> str:
    return f"backend-{name}"


@dataclass
class UnitView:
    """What `status` shows for one unit."""

    unit: str
    kind: str
    model: str = ""
    url: str = ""
    pid: int | None = None
    health: str = "unknown"
    detail: str = ""
    restarts: int = 0
    gpus: list[int] = field(default_factory=list)


@dataclass
class PassResult:
    """One pass, as status reads it."""

    actions: list[Action]
    health: Mapping[str, BackendHealth]
    failures: Mapping[str, str]  # unit -> why its change failed or was rolled back
    urls: Mapping[str, str]
    gpus: Mapping[str, list[int]]  # backend -> the GPUs placement gave it


def unit_views(
    state: DesiredState, records: Iterable[UnitRecordLike], result: PassResult
) -> list[UnitView]:
    views = []
    refusals = {a.unit: a.reason for a in result.actions if a.kind is ActionKind.REFUSE}
    # What a unit waits for (a drain, a replica, a retry, its model): why a change is pending.
    holds = {a.unit: a.reason for a in result.actions if a.kind in _HOLDS}
    for record in records:
        name = record.name
        backend = state.backends.get(name.removeprefix("backend-"))
        health = result.health.get(name, BackendHealth(Health.DOWN, "not observed yet"))
        views.append(
            UnitView(
                unit=name,
                kind=backend.kind if backend else "gateway",
                model=backend.model if backend else "",
                url=result.urls.get(name, ""),
                pid=record.pid,
                health=health.state.value,
                detail=refusals.get(name)
                or result.failures.get(name)
                or getattr(record, "error", None)  # process driver: launch failed
                or holds.get(name)
                or health.detail,
                restarts=record.restarts,
                gpus=list(result.gpus.get(name.removeprefix("backend-"), [])),
            )
        )
    seen = {v.unit for v in views}
    for action in result.actions:  # declared but nothing installed yet: refused, or its model
        if action.unit in seen or action.kind not in (
            ActionKind.REFUSE,
            ActionKind.PULL,
            ActionKind.WAIT,
        ):
            continue
        backend = state.backends.get(action.unit.removeprefix("backend-"))
        if backend is None:
            continue
        seen.add(action.unit)
        shown = "refused" if action.kind is ActionKind.REFUSE else "waiting"
        views.append(
            UnitView(action.unit, backend.kind, backend.model, health=shown, detail=action.reason)
        )
    return views
