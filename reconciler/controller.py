"""The reconcile loop: read the whole desired state, observe the whole running state, plan the
difference, let the driver act. Level-triggered: nothing is remembered between passes except
what the driver records on disk, so a restarted controller picks up where things are."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.backends.commands import launch_for, model_reference
from reconciler.backends.health import BackendHealth, Health, probe
from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.schema import DesiredState, reach
from reconciler.drain import DRAIN_DIR_ENV, Drainer, drain_dir
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.drivers.process import ProcessDriver
from reconciler.drivers.systemd import SystemdDriver, systemd_booted, unit_dir_writable
from reconciler.gpu.inventory import GpuInventory, NvmlInventory
from reconciler.gpu.placement import Placement, place
from reconciler.gpu.vram import VramEstimate, estimate_vram
from reconciler.models.pull import PullError, local_path, pull_model
from reconciler.paths import models_dir, state_dir
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit, plan
from reconciler.units.render import backend_unit_spec, gateway_unit_spec, render_unit

log = logging.getLogger(__name__)

GATEWAY_UNIT = "gateway"
# The GPUs a unit runs on, in a process launch description ("KEY": "0,1") or a unit file
# (Environment="KEY=0,1").
_VISIBLE_RE = re.compile(r'CUDA_VISIBLE_DEVICES(?:=|": ")([0-9]+(?:,[0-9]+)*)"')


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


def make_driver(choice: str | None, state: Path, unit_dir: Path | None = None):
    """`systemd`, `process`, or None/`auto`: systemd when it is PID 1 and we may write units."""
    choice = choice or os.environ.get("TF_DRIVER") or "auto"
    if choice == "auto":
        use_systemd = unit_dir is not None or (systemd_booted() and unit_dir_writable())
        choice = "systemd" if use_systemd else "process"
    if choice == "systemd":
        return SystemdDriver(unit_dir, state_dir=state) if unit_dir else SystemdDriver(state_dir=state)
    if choice == "process":
        return ProcessDriver(state)
    raise ValueError(f"--driver: {choice!r} is not one of systemd, process, auto")


class Controller:
    def __init__(
        self,
        config: str | None,
        driver: ProcessDriver | SystemdDriver | str | None = None,
        gpus: GpuInventory | None = None,
        state: Path | None = None,
        unit_dir: Path | None = None,
        run_gateway: bool = True,
    ):
        self.config = config
        # False: the gateway runs as its own service (the NixOS module); reconcile backends only.
        self.run_gateway = run_gateway
        self.desired = self._load()
        self.state_dir = state or state_dir(self.desired.state_dir)
        sweep_orphans(self.state_dir)  # status.json written by a reconciler killed mid-write
        self.models_dir = models_dir(self.desired.models_dir)
        if driver is None or isinstance(driver, str):
            driver = make_driver(driver, self.state_dir, unit_dir)
        self.driver = driver
        self.apply_failures: dict[str, str] = {}
        self.gpus = gpus or NvmlInventory()
        self.placement = Placement()
        self.health: dict[str, BackendHealth] = {}
        self.last_actions: list[Action] = []
        self.last_desired: dict[str, DesiredUnit] = {}
        self.model_errors: dict[str, str] = {}
        self.drainer = Drainer(drain_dir(self.state_dir))

    def _load(self) -> DesiredState:
        return load_desired_state(self.config)[0]

    # -- desired -------------------------------------------------------------------------
    def _model_path(self, model_name: str) -> str | None:
        path = local_path(model_name, self.desired.models[model_name], self.models_dir)
        return str(path) if path else None

    def ensure_model(self, unit: str) -> bool:
        """Pull a backend's model before starting it; False (and a reason) if it failed."""
        backend = self.desired.backends.get(unit.removeprefix("backend-"))
        if backend is None or not backend.managed:
            return True
        spec = self.desired.models[backend.model]
        if spec.source.startswith("ollama:"):
            return True
        try:
            pull_model(backend.model, spec, self.models_dir)
        except PullError as exc:
            self.model_errors[unit] = str(exc)
            log.error("cannot start %s: %s", unit, exc)
            return False
        self.model_errors.pop(unit, None)
        return True

    def vram_estimates(self) -> dict[str, int | VramEstimate]:
        """What each GPU backend needs, for placement (0 when unknown): a whole estimate, since
        vLLM's need is a share of each GPU's own size."""
        estimates: dict[str, int | VramEstimate] = {}
        for name, backend in self.desired.backends.items():
            if backend.managed and backend.gpus_wanted:
                path = self._model_path(backend.model)
                estimates[name] = estimate_vram(backend, self.desired.models[backend.model], path)
        return estimates

    def running_gpus(self, observed: dict[str, ObservedUnit]) -> dict[str, list[int]]:
        """The GPUs each running backend was started on, read from what runs (so a restarted
        reconciler knows it too)."""
        running = {}
        for unit, seen in observed.items():
            match = _VISIBLE_RE.search(seen.content or "") if seen.active else None
            if match and unit.startswith("backend-"):
                running[unit.removeprefix("backend-")] = [int(i) for i in match.group(1).split(",")]
        return running

    def desired_units(self, observed: dict[str, ObservedUnit] | None = None) -> dict[str, DesiredUnit]:
        """`observed`: what runs now. Without it, placement ignores that running backends
        already hold GPU memory (fine for rendering; a pass must pass it, or a backend that
        fits no more beside itself is moved or stopped)."""
        state = self.desired
        observed = observed or {}
        running = self.running_gpus(observed)
        gpus = self.gpus.gpus()
        # NVML erred this pass: the GPUs running backends hold but the inventory lacks exist, only
        # unread. A monitoring failure must not move or stop what runs on them.
        failed = self.gpus.failed
        seen = {g.index for g in gpus}
        unread = {i for held in running.values() for i in held if i not in seen} if failed else set()
        placement = place(state.backends, gpus, self.vram_estimates(), running, unread)
        held: set[str] = set()  # running backends kept exactly as they run this pass
        if failed:
            for name in state.backends:
                now = observed.get(backend_unit(name))
                blind = name in placement.refused or unread & set(placement.assignments.get(name, []))
                if blind and now is not None and now.active and now.content:
                    held.add(name)
            placement = Placement(
                {**placement.assignments, **{n: running[n] for n in held if n in running}},
                {
                    n: f"{r} (GPU inventory: {self.gpus.reason})"
                    for n, r in placement.refused.items()
                    if n not in held
                },
            )
        self.placement = placement
        systemd = isinstance(self.driver, SystemdDriver)
        units: dict[str, DesiredUnit] = {}
        for name, backend in state.backends.items():
            if not backend.managed:
                continue  # runs elsewhere: the gateway routes to it, we leave it alone
            unit = backend_unit(name)
            if name in held:
                # Whether it (or a change to it) fits cannot be judged without its GPUs' state:
                # keep it exactly as it runs, no stop and no restart, until NVML answers again.
                units[unit] = DesiredUnit(unit, observed[unit].content or "", group=backend.model)
                continue
            if name in self.placement.refused:
                units[unit] = DesiredUnit(unit, "", backend.model, self.placement.refused[name])
                continue
            path = self._model_path(backend.model)
            ref = model_reference(backend.model, state.models[backend.model], path)
            gpu_ids = self.placement.assignments.get(name, [])
            launch = launch_for(name, backend, backend.model, ref, gpu_ids)
            if systemd:
                spec = backend_unit_spec(unit, backend, backend.model, ref, launch, gpu_ids)
                units[unit] = DesiredUnit(unit, render_unit(spec), group=backend.model)
                continue
            env = dict(launch.env)
            if backend.kind == "ollama":
                env.setdefault("OLLAMA_MODELS", str(self.state_dir / "ollama"))
            content = json.dumps({"argv": launch.argv, "env": env}, indent=1, sort_keys=True)
            units[unit] = DesiredUnit(unit, content + "\n", group=backend.model)
        if state.gateway.enable and self.run_gateway:
            argv = [sys.executable, "-m", "reconciler.cli", "gateway"]
            if self.config:
                argv += ["--config", str(Path(self.config).resolve())]
            if systemd:  # the unit text holds argv; a config edit reaches it through `up`
                # Under its own user the gateway still finds the reconciler's drain marks.
                env = {DRAIN_DIR_ENV: str(drain_dir(self.state_dir))}
                spec = gateway_unit_spec(GATEWAY_UNIT, argv, state.gateway, self.config, env)
                units[GATEWAY_UNIT] = DesiredUnit(GATEWAY_UNIT, render_unit(spec))
                return units
            # The gateway restarts when its part of the desired state changes.
            spec = state.gateway.model_dump(mode="json")
            content = json.dumps({"argv": argv, "env": {}, "gateway": spec}, indent=1, sort_keys=True)
            units[GATEWAY_UNIT] = DesiredUnit(GATEWAY_UNIT, content + "\n")
        return units

    # -- observe -------------------------------------------------------------------------
    def _probe_target(self, unit: str) -> tuple[str, str] | None:
        if unit == GATEWAY_UNIT:
            g = self.desired.gateway
            return f"http://{reach(g.host, g.port)}", "gateway"
        name = unit.removeprefix("backend-")
        backend = self.desired.backends.get(name)
        if backend is None:
            return None
        return backend.base_url, backend.wire_protocol

    def observe(self) -> dict[str, ObservedUnit]:
        observed = self.driver.observe()
        for name, seen in list(observed.items()):
            target = self._probe_target(name)
            if not seen.active or target is None:
                self.health[name] = BackendHealth(Health.DOWN, "not running")
                continue
            health = probe(*target, timeout=1.0)
            self.health[name] = health
            if health.ok:
                self.driver.mark_healthy(name)
            observed[name] = ObservedUnit(
                name, seen.content, seen.active, health.state, seen.failures, seen.retry_at
            )
        return observed

    # -- act -----------------------------------------------------------------------------
    def plan(self) -> list[Action]:
        observed = self.observe()
        return plan(self.desired_units(observed), observed, time.time())

    def reconcile_once(self) -> list[Action]:
        try:
            self.desired = self._load()
        except ConfigError as exc:
            # Keep running what was declared last; a typo must not take the host down.
            log.error("desired state invalid, keeping the previous one:\n%s", exc)
        observed = self.observe()
        desired = self.last_desired = self.desired_units(observed)
        actions = self._hold_for_drains(plan(desired, observed, time.time()), desired, observed)
        if isinstance(self.driver, SystemdDriver):
            self._apply_systemd(actions, desired)
        for action in actions:
            if isinstance(self.driver, SystemdDriver):
                pass  # carried out above, as one pass
            elif action.kind is ActionKind.START:
                if self.ensure_model(action.unit):
                    self.driver.start(desired[action.unit])
            elif action.kind is ActionKind.RESTART:
                try:  # its model was checked and its drain finished in _hold_for_drains
                    self.driver.restart(desired[action.unit])
                finally:
                    self.drainer.end(action.unit.removeprefix("backend-"))
            elif action.kind is ActionKind.STOP:
                try:
                    self.driver.stop(action.unit, forget=action.unit not in desired)
                finally:
                    self.drainer.end(action.unit.removeprefix("backend-"))
            # Waiting and refusing repeat every pass: say them once, when they change.
            if action.kind in (ActionKind.WAIT, ActionKind.REFUSE) and action == self._previous(
                action.unit
            ):
                continue
            log.info("%s", action)
        self.last_actions = actions
        self.write_status()
        return actions

    def _hold_for_drains(
        self, actions: list[Action], desired: dict[str, DesiredUnit], observed: dict[str, ObservedUnit]
    ) -> list[Action]:
        """Let a stop or restart of a declared backend through only once the gateway has
        drained it (reconciler/drain.py); until then it is a WAIT, and this pass, like every
        pass, goes on with everything else. A drain no longer planned is dropped."""
        held: list[Action] = []
        stopping: set[str] = set()
        for action in actions:
            name = action.unit.removeprefix("backend-")
            backend = self.desired.backends.get(name)
            if action.kind not in (ActionKind.RESTART, ActionKind.STOP) or action.unit == GATEWAY_UNIT or backend is None:
                held.append(action)
                continue
            seen = observed.get(action.unit)
            if self._deferred(action, desired) or seen is None or not seen.active:
                held.append(action)  # not acted on this pass, or nothing running: nothing to drain
                continue
            if action.kind is ActionKind.RESTART and not self.ensure_model(action.unit):
                # The new version cannot start: keep the old one running and routed.
                reason = f"settings changed, but the model is not ready: {self.model_errors.get(action.unit)}"
                held.append(Action(ActionKind.WAIT, action.unit, reason, action.diff))
                continue
            stopping.add(name)
            replicas = [n for n, b in self.desired.backends.items() if b.model == backend.model and n != name]
            url = self._probe_target(GATEWAY_UNIT)[0] if self.desired.gateway.enable else None  # type: ignore[index]
            ack = 3 * self.desired.gateway.health_interval + 2.0  # the gateway reads marks each round
            if self.drainer.ready(name, url, replicas, timeout=backend.drain_timeout, ack_timeout=ack):
                held.append(action)
            else:
                held.append(Action(ActionKind.WAIT, action.unit, self.drainer.waiting(name), action.diff))
        self.drainer.end_all_but(stopping)
        return held

    def _deferred(self, action: Action, desired: dict[str, DesiredUnit]) -> bool:
        """True when the driver is backing off this change (a rolled-back unit)."""
        unit = desired.get(action.unit)
        return (
            isinstance(self.driver, SystemdDriver)
            and unit is not None
            and self.driver.backing_off(action.unit, unit.content)
        )

    def _apply_systemd(self, actions: list[Action], desired: dict[str, DesiredUnit]) -> None:
        def health(unit: str) -> BackendHealth:
            target = self._probe_target(unit)
            state = probe(*target, timeout=1.0) if target else BackendHealth(Health.HEALTHY)
            self.health[unit] = state
            return state

        timeouts = {
            backend_unit(n): b.health_timeout for n, b in self.desired.backends.items()
        }
        timeouts[GATEWAY_UNIT] = 60.0

        @contextlib.contextmanager
        def drained(unit: str) -> Iterator[None]:
            """Back into routing as soon as systemctl has restarted (or stopped) it, not after
            the health waits of the whole pass."""
            try:
                yield
            finally:
                self.drainer.end(unit.removeprefix("backend-"))

        try:
            failures = self.driver.apply(actions, desired, health, timeouts, self.ensure_model, drained)
        finally:
            for action in actions:  # whatever the driver did or skipped, no mark outlives a pass
                if action.kind in (ActionKind.RESTART, ActionKind.STOP):
                    self.drainer.end(action.unit.removeprefix("backend-"))
        for failure in failures:
            self.apply_failures[failure.unit] = failure.reason
        for action in actions:
            if action.kind in (ActionKind.START, ActionKind.RESTART) and self.health.get(
                action.unit, BackendHealth(Health.DOWN)
            ).ok:
                self.apply_failures.pop(action.unit, None)

    def _previous(self, unit: str) -> Action | None:
        return next((a for a in self.last_actions if a.unit == unit), None)

    def wait_healthy(self, timeout: float, units: list[str] | None = None) -> bool:
        """Reconcile until every unit (or the named ones) is healthy and nothing is left to
        do (a rolling change goes replica by replica, over several passes), or time runs out."""
        deadline = time.monotonic() + timeout
        pending = (ActionKind.START, ActionKind.RESTART, ActionKind.STOP, ActionKind.WAIT)
        self.drainer.clear_stale()
        while time.monotonic() < deadline:
            self.reconcile_once()
            wanted = units or list(self.last_desired)
            if self.apply_failures:
                return False  # a change was rolled back: the declared state is not running
            converged = not any(a.kind in pending and (not units or a.unit in units) for a in self.last_actions)
            if converged and all(self.health.get(u, BackendHealth(Health.DOWN)).ok for u in wanted):
                return True
            refused = [a for a in self.last_actions if a.kind is ActionKind.REFUSE]
            if refused and not units:
                return False
            time.sleep(0.25)
        return False

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        metrics = self._metrics_exporter()
        self.drainer.clear_stale()
        try:
            while not stop.is_set():
                ok = True
                try:
                    self.reconcile_once()
                except Exception:  # one bad pass must not end supervision of everything else
                    ok = False
                    log.exception("reconcile pass failed; retrying")
                if metrics is not None:
                    metrics.observe_pass(self, ok)
                stop.wait(interval)
        finally:
            if metrics is not None:
                metrics.close()

    def _metrics_exporter(self):
        """The reconciler's /metrics when monitoring is enabled; a busy port is logged, not fatal."""
        if not self.desired.monitoring.enable:
            return None
        from reconciler.monitoring.reconciler_metrics import ReconcilerMetricsExporter

        try:
            m = self.desired.monitoring
            return ReconcilerMetricsExporter(m.reconciler_metrics_port, m.listen_address)
        except OSError as exc:
            log.error("%s", exc)
            return None

    def shutdown(self) -> None:
        """Stop the gateway first (no new requests), then the backends."""
        if isinstance(self.driver, SystemdDriver):
            self.drainer.end_all_but(set())  # a change not made: route to the old unit again
            self.write_status()  # systemd units outlive the reconciler: leave them running
            return
        names = [r.name for r in self.driver.records()]
        for name in sorted(names, key=lambda n: n != GATEWAY_UNIT):
            self.driver.stop(name)
        self.drainer.end_all_but(set())
        self.write_status()

    # -- status --------------------------------------------------------------------------
    def views(self) -> list[UnitView]:
        views = []
        refusals = {a.unit: a.reason for a in self.last_actions if a.kind is ActionKind.REFUSE}
        # What a unit waits for (a drain, a replica, a retry): status says why a change is pending.
        waits = {a.unit: a.reason for a in self.last_actions if a.kind is ActionKind.WAIT}
        for record in self.driver.records():
            name = record.name
            backend = self.desired.backends.get(name.removeprefix("backend-"))
            target = self._probe_target(name)
            health = self.health.get(name, BackendHealth(Health.DOWN, "not observed yet"))
            views.append(
                UnitView(
                    unit=name,
                    kind=backend.kind if backend else "gateway",
                    model=backend.model if backend else "",
                    url=target[0] if target else "",
                    pid=record.pid,
                    health=health.state.value,
                    detail=refusals.get(name)
                    or self.apply_failures.get(name)
                    or self.model_errors.get(name)
                    or getattr(record, "extra", {}).get("error")  # process driver: launch failed
                    or waits.get(name)
                    or health.detail,
                    restarts=record.restarts,
                    gpus=self.placement.assignments.get(name.removeprefix("backend-"), []),
                )
            )
        for unit, reason in refusals.items():
            if not any(v.unit == unit for v in views):
                backend = self.desired.backends[unit.removeprefix("backend-")]
                views.append(UnitView(unit, backend.kind, backend.model, health="refused", detail=reason))
        return views

    def write_status(self) -> None:
        status = {
            "config": self.config or "embedded:default",
            "updated_at": time.time(),
            "gateway": self._probe_target(GATEWAY_UNIT)[0] if self.desired.gateway.enable else None,
            "gpus": self.gpus.reason or "ok",
            "units": [v.__dict__ for v in self.views()],
        }
        write_atomic(self.state_dir / "status.json", json.dumps(status, indent=1))
