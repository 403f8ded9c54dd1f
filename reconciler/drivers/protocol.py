"""What every driver is: the one shape the reconcile loop talks to (process and systemd).

A driver renders a unit's content in its own form, reports what runs (with the unit's history:
backoff, trial, rollback; and a stop under way), and carries out the plan's actions on units
without waiting for any: a stop is asked for and observed next pass. It decides nothing: the
plan did. Drains, pulls and waits are the controller's."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from reconciler.backends.commands import Launch
from reconciler.config.schema import BackendSpec, GatewaySpec
from reconciler.drivers.history import HistoryStore
from reconciler.plan import Action, DesiredUnit, ObservedUnit


class UnitRecordLike(Protocol):
    name: str
    content: str
    pid: int | None
    restarts: int


class Driver(Protocol):
    name: str
    outlives_supervisor: bool  # its units run on when the reconciler stops (systemd)
    history: HistoryStore

    def backend_content(
        self, unit: str, backend: BackendSpec, ref: str, launch: Launch, gpu_ids: list[int]
    ) -> str: ...

    def gateway_content(
        self, argv: list[str], gateway: GatewaySpec, config: str | None, env: dict[str, str]
    ) -> str: ...

    def observe(self, record: bool = True) -> dict[str, ObservedUnit]:
        """What runs; `record=False` (`tensorforge plan`): the same answer, nothing written."""

    def records(self) -> Sequence[UnitRecordLike]: ...

    def mark_healthy(self, name: str) -> None: ...

    def execute(
        self,
        actions: Sequence[Action],
        desired: Mapping[str, DesiredUnit],
        done: Callable[[Action, str | None], None] = ...,
    ) -> None: ...

    def halt(self, name: str, forget: bool = False) -> None:
        """Stop a unit and wait until it has: for shutting down, never in a pass."""
