"""The reconcile loop: read the whole desired state, observe the whole running state, plan the
difference, let the driver act. Level-triggered: nothing decides from memory of earlier passes
except what is recorded on disk (unit history, drain marks, pending systemd changes) and what
this process is doing off the pass (model pulls), all of it observed and handed to the pure
plan. So `plan` shows exactly what `apply` does; nothing in a pass waits on a backend."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.admin_requests import (
    AdminRequest,
    admin_requests_dir,
    finish,
    read_requests,
    request_fields,
    satisfied,
)
from reconciler.backends.backend_health import BackendHealth, Health
from reconciler.backends.commands import launch_for, model_reference
from reconciler.backends.health import probe
from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.schema import ModelSpec, reach
from reconciler.drain import (
    DRAIN_DIR_ENV,
    Drainer,
    DrainRule,
    drain_dir,
    drain_states,
    gateway_health,
    read_marks,
    wedged_backends,
)
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.drivers.process import ProcessDriver
from reconciler.drivers.protocol import Driver
from reconciler.drivers.systemd import SystemdDriver, systemd_booted, unit_dir_writable
from reconciler.gateway.router import backend_headers, served_name
from reconciler.gpu.inventory import GpuInventory, NvmlInventory
from reconciler.gpu.placement import Placement, place
from reconciler.gpu.vram import VramEstimate, estimate_vram
from reconciler.models.pull import local_path, open_registry, pull_model
from reconciler.models.registry import Registry
from reconciler.monitoring.reconciler_metrics import ReconcilerMetricsExporter
from reconciler.paths import models_dir, state_dir
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit, plan
from reconciler.pulls import ModelPuller
from reconciler.status import GATEWAY_UNIT, PassResult, UnitView, backend_unit, unit_views

log = logging.getLogger(__name__)

__all__ = ["GATEWAY_UNIT", "Controller", "UnitView", "backend_unit", "make_driver"]

# Actions after which the desired state is not (yet) running.
UNSETTLED = frozenset(ActionKind) - {ActionKind.REFUSE}


def make_driver(choice: str | None, state: Path, unit_dir: Path | None = None) -> Driver:
    """`systemd`, `process`, or None/`auto`: systemd when it is PID 1 and we may write units."""
    choice = choice or os.environ.get("TF_DRIVER") or "auto"
    if choice == "auto":
        use_systemd = unit_dir is not None or (systemd_booted() and unit_dir_writable())
        choice = "systemd" if use_systemd else "process"
    if choice == "systemd":
        return (
            SystemdDriver(unit_dir, state_dir=state) if unit_dir else SystemdDriver(state_dir=state)
        )
    if choice == "process":
        return ProcessDriver(state)
    raise ValueError(f"--driver: {choice!r} is not one of systemd, process, auto")


class Controller:
    def __init__(
        self,
        config: str | None,
        driver: Driver | str | None = None,
        gpus: GpuInventory | None = None,
        state: Path | None = None,
        unit_dir: Path | None = None,
        run_gateway: bool = True,
    ):
        self.config = config
        # False: the gateway runs as its own service (the NixOS module); reconcile backends only.
        self.run_gateway = run_gateway
        self.desired = load_desired_state(config)[0]
        self.config_error: str | None = None  # a desired state refused while running: why
        self.writer = "supervisor"  # who runs the passes: `up`, or `apply` (which then exits)
        self.state_dir = state or state_dir(self.desired.state_dir)
        sweep_orphans(self.state_dir)  # status.json written by a reconciler killed mid-write
        self.models_dir = models_dir(self.desired.models_dir, self.desired.state_dir)
        if driver is None or isinstance(driver, str):
            driver = make_driver(driver, self.state_dir, unit_dir)
        self.driver: Driver = driver
        self.gpus = gpus or NvmlInventory()
        self.placement = Placement()
        self.health: dict[str, BackendHealth] = {}
        self.apply_failures: dict[str, str] = {}
        self.admin_requests: dict[str, AdminRequest] = {}
        self.admin_problems: list[str] = []  # request files that could not be used, and why
        self.last_actions: list[Action] = []
        self.last_desired: dict[str, DesiredUnit] = {}
        self.drainer = Drainer(drain_dir(self.state_dir))
        self._registry: Registry | None = None  # opened once, when the first model needs it
        self._registry_lock = threading.Lock()
        self._paths: dict[str, Path | None] = {}  # models' files, looked up this pass
        self.puller = ModelPuller(self.state_dir, self._pull, self._present)

    # -- models --------------------------------------------------------------------------
    def registry(self, create: bool = False) -> Registry | None:
        with self._registry_lock:
            if self._registry is None:
                self._registry = open_registry(self.models_dir, create)
            return self._registry

    def _model_path(self, model_name: str) -> str | None:
        path = self._present(model_name, self.desired.models[model_name])
        return str(path) if path else None

    def _present(self, name: str, spec: ModelSpec) -> Path | None:
        """Where a model's file is: the registry is asked once a pass per model (placement,
        readiness and the launch line all need it)."""
        if name not in self._paths:
            self._paths[name] = local_path(name, spec, self.models_dir, registry=self.registry())
        return self._paths[name]

    def _pull(self, name: str, spec: ModelSpec) -> None:
        pull_model(name, spec, self.models_dir, registry=self.registry(create=True))

    def vram_estimates(self) -> dict[str, int | VramEstimate]:
        """What each GPU backend needs, for placement (0 when unknown): a whole estimate, since
        vLLM's need is a share of each GPU's own size."""
        estimates: dict[str, int | VramEstimate] = {}
        for name, backend in self.desired.backends.items():
            if backend.managed and backend.gpus_wanted:
                path = self._model_path(backend.model)
                estimates[name] = estimate_vram(backend, self.desired.models[backend.model], path)
        return estimates

    # -- desired -------------------------------------------------------------------------
    def _placement(self, observed: dict[str, ObservedUnit]) -> tuple[Placement, set[str]]:
        """Where each GPU backend goes, and the running ones held exactly as they run because
        NVML erred this pass (a monitoring failure must not move or stop them)."""
        running = {
            u.removeprefix("backend-"): list(s.gpus)
            for u, s in observed.items()
            if s.active and s.gpus and u.startswith("backend-")
        }
        gpus = self.gpus.gpus()
        failed = self.gpus.failed
        seen = {g.index for g in gpus}
        unread = (
            {i for held in running.values() for i in held if i not in seen} if failed else set()
        )
        placement = place(self.desired.backends, gpus, self.vram_estimates(), running, unread)
        held: set[str] = set()
        if failed:
            for name in self.desired.backends:
                now = observed.get(backend_unit(name))
                blind = name in placement.refused or unread & set(
                    placement.assignments.get(name, [])
                )
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
        return placement, held

    def desired_units(
        self, observed: dict[str, ObservedUnit] | None = None
    ) -> dict[str, DesiredUnit]:
        """`observed`: what runs now. Without it, placement ignores that running backends
        already hold GPU memory (fine for rendering; a pass must pass it, or a backend that
        fits no more beside itself is moved or stopped)."""
        state = self.desired
        observed = observed or {}
        self._paths = {}  # a pull may have finished since the last pass
        self.placement, held = self._placement(observed)
        drain = state.gateway.enable  # a gateway (here or its own service) routes to backends
        # Operators' drain/restart requests (the gateway's admin API) are inputs like the rest.
        known_problems = set(self.admin_problems)
        self.admin_requests, self.admin_problems = read_requests(
            admin_requests_dir(self.state_dir), state.backends
        )
        for problem in self.admin_problems:
            if problem not in known_problems:  # said once, not every pass
                log.warning("admin request ignored: %s", problem)
        units: dict[str, DesiredUnit] = {}
        for name, backend in state.backends.items():
            if not backend.managed:
                continue  # runs elsewhere: the gateway routes to it, we leave it alone
            unit = backend_unit(name)
            timing = DesiredUnit(unit, "", backend.model, drain=drain, health_timeout=backend.health_timeout,
                                 liveness_timeout=backend.liveness_timeout or None,
                                 **request_fields(self.admin_requests.get(name)))  # fmt: skip
            if name in held:
                # Whether it (or a change to it) fits cannot be judged without its GPUs' state:
                # keep it exactly as it runs, no stop and no restart, until NVML answers again.
                units[unit] = replace(timing, content=observed[unit].content or "")
                continue
            if name in self.placement.refused:
                units[unit] = DesiredUnit(unit, "", backend.model, self.placement.refused[name])
                continue
            spec = state.models[backend.model]
            wait, pull = (
                (None, False)
                if spec.source.startswith("ollama:")
                else self.puller.readiness(backend.model, spec)
            )
            path = self._model_path(backend.model)
            ref = model_reference(backend.model, spec, path)
            gpu_ids = self.placement.assignments.get(name, [])
            launch = launch_for(name, backend, backend.model, ref, gpu_ids)
            content = self.driver.backend_content(unit, backend, ref, launch, gpu_ids)
            units[unit] = replace(timing, content=content, model_wait=wait, model_pull=pull)
        if state.gateway.enable and self.run_gateway:
            argv = [sys.executable, "-m", "reconciler.cli", "gateway"]
            if self.config:
                argv += ["--config", str(Path(self.config).resolve())]
            # Under its own user the gateway still finds the reconciler's drain marks.
            env = {DRAIN_DIR_ENV: str(drain_dir(self.state_dir))}
            content = self.driver.gateway_content(argv, state.gateway, self.config, env)
            units[GATEWAY_UNIT] = DesiredUnit(
                GATEWAY_UNIT, content, health_timeout=60.0, drains_others=True
            )
        return units

    # -- observe -------------------------------------------------------------------------
    def _probe_target(self, unit: str) -> tuple[str, str] | None:
        if unit == GATEWAY_UNIT:
            g = self.desired.gateway
            return f"http://{reach(g.host, g.port)}", "gateway"
        backend = self.desired.backends.get(unit.removeprefix("backend-"))
        return (backend.base_url, backend.wire_protocol) if backend else None

    def _probe_identity(self, unit: str) -> dict[str, Any]:
        """The backend's key (api_key_file) and the model name it must answer to: a vLLM
        serving another name is up but useless (every request 404), so not healthy."""
        name = unit.removeprefix("backend-")
        backend = self.desired.backends.get(name)
        if unit == GATEWAY_UNIT or backend is None:
            return {}
        try:
            headers = backend_headers(name, backend)
        except ValueError as exc:
            log.warning("%s", exc)
            headers = {}
        source = self.desired.models[backend.model].source
        return {
            "headers": headers,
            "model": served_name(backend.model, source, backend.wire_protocol),
        }

    def _gateway_url(self) -> str | None:
        return self._probe_target(GATEWAY_UNIT)[0] if self.desired.gateway.enable else None  # type: ignore[index]

    def observe(self, record: bool = True) -> dict[str, ObservedUnit]:
        """What runs, how it answers, and where its drain stands. `record`: write what was
        learnt (a healthy unit's trial ends); `tensorforge plan` only reads."""
        observed = self.driver.observe(record)
        now = time.time()
        backends = self.desired.backends
        rules = {
            n: DrainRule(
                [r for r, o in backends.items() if o.model == b.model and r != n], b.drain_timeout
            )
            for n, b in backends.items()
        }
        ack = 3 * self.desired.gateway.health_interval + 2.0  # the gateway reads marks each round
        marks = read_marks(self.drainer.directory)
        gateway = self._gateway_url()
        # One /health question a pass, and only with a local backend to ask about.
        asked = gateway and (marks or any(o.active for o in observed.values()))
        report = gateway_health(gateway) if asked else "no gateway"
        drains = drain_states(marks, report, rules, now, ack)
        wedged = wedged_backends(report)
        answers = self._probe_all(observed)
        for name, seen in list(observed.items()):
            drain = drains.get(name.removeprefix("backend-"))
            if name not in answers:
                why = "stopping" if seen.stopping is not None else "not running"
                self.health[name] = BackendHealth(Health.DOWN, why)
                observed[name] = replace(seen, drain=drain)
                continue
            health = self.health[name] = answers[name]
            answered = health.state is not Health.DOWN
            if record:
                history = self.driver.history.probed(name, answered, now)
                if health.ok:
                    self.driver.mark_healthy(name)
            else:
                history = self.driver.history.load(name)
            silent = None
            if not answered and (history.answered or history.silent_since is not None):
                silent = now - (history.silent_since or now)
            observed[name] = replace(
                seen,
                health=health.state,
                detail=health.detail,
                silent_for=silent,
                drain=drain,
                wedged=wedged.get(name.removeprefix("backend-")),
            )
        return observed

    def _probe_all(self, observed: dict[str, ObservedUnit]) -> dict[str, BackendHealth]:
        """Every running unit's probe at once: hung backends cost a pass one probe timeout
        (1 s), not one each."""
        targets = {
            name: target
            for name, seen in observed.items()
            if seen.active and seen.stopping is None and (target := self._probe_target(name))
        }
        if not targets:
            return {}

        def ask(name: str) -> BackendHealth:
            return probe(*targets[name], timeout=1.0, **self._probe_identity(name))

        with ThreadPoolExecutor(max_workers=min(len(targets), 16)) as pool:
            return dict(zip(targets, pool.map(ask, targets), strict=True))

    # -- act -----------------------------------------------------------------------------
    def plan(self) -> list[Action]:
        """What the next pass will do: the same inputs, nothing written."""
        observed = self.observe(record=False)
        return plan(self.desired_units(observed), observed, time.time())

    def _reload(self) -> None:
        """A desired state that is empty, truncated or invalid while running changes nothing:
        the last good one stays in force, and status and a metric say it was refused."""
        try:
            if self.config and not _declares_anything(Path(self.config)):
                raise ConfigError(
                    self.config, ["the file is empty (truncated?); declare at least one section"]
                )
            self.desired = load_desired_state(self.config)[0]
        except ConfigError as exc:
            if self.config_error != str(exc):
                log.error("desired state refused, keeping the last good one:\n%s", exc)
            self.config_error = str(exc)
            return
        self.config_error = None

    def reconcile_once(self) -> list[Action]:
        self._reload()
        observed = self.observe()
        desired = self.last_desired = self.desired_units(observed)
        actions = plan(desired, observed, time.time())
        self.execute(actions, desired)
        for request in satisfied(actions, self.admin_requests):
            finish(admin_requests_dir(self.state_dir), request)
        for action in actions:
            # Waiting and refusing repeat every pass: say them once, when they change.
            if action.kind in (ActionKind.WAIT, ActionKind.REFUSE) and action == self._previous(
                action.unit
            ):
                continue
            log.info("%s", action)
        self.last_actions = actions
        self.write_status()
        return actions

    def execute(self, actions: list[Action], desired: dict[str, DesiredUnit]) -> None:
        """The controller's own actions (drains, pulls), then the driver's (units)."""
        for action in actions:
            backend = action.unit.removeprefix("backend-")
            if action.kind is ActionKind.DRAIN:
                self.drainer.mark(backend)
            elif action.kind is ActionKind.UNDRAIN:
                self.drainer.end(backend)
            elif action.kind is ActionKind.PULL and backend in self.desired.backends:
                model = self.desired.backends[backend].model
                self.puller.request(model, self.desired.models[model])
            elif action.kind in (ActionKind.ROLLBACK, ActionKind.FAIL):
                self.apply_failures[action.unit] = action.reason

        # A drain ends by the plan's UNDRAIN, once the unit is no longer observed stopping.
        def done(action: Action, error: str | None) -> None:
            if error:
                self.apply_failures[action.unit] = error

        self.driver.execute(actions, desired, done)
        for unit, health in self.health.items():
            if health.ok:
                self.apply_failures.pop(unit, None)

    def _previous(self, unit: str) -> Action | None:
        return next((a for a in self.last_actions if a.unit == unit), None)

    def wait_healthy(self, timeout: float, units: list[str] | None = None) -> bool:
        """Reconcile until every unit (or the named ones) is healthy and nothing is left to
        do (a rolling change goes replica by replica, over several passes), or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reconcile_once()
            wanted = units or list(self.last_desired)
            if any(a.kind in (ActionKind.ROLLBACK, ActionKind.FAIL) for a in self.last_actions):
                return False  # a change was rolled back: the declared state is not running
            converged = not any(
                a.kind in UNSETTLED and (not units or a.unit in units) for a in self.last_actions
            )
            if converged and all(self.health.get(u, BackendHealth(Health.DOWN)).ok for u in wanted):
                return True
            refused = [a for a in self.last_actions if a.kind is ActionKind.REFUSE]
            if refused and not units:
                return False
            time.sleep(0.25)
        return False

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        metrics = self._metrics_exporter()
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

    def _metrics_exporter(self) -> ReconcilerMetricsExporter | None:
        """The reconciler's /metrics when monitoring is enabled; a busy port is logged, not fatal."""
        if not self.desired.monitoring.enable:
            return None
        try:
            m = self.desired.monitoring
            return ReconcilerMetricsExporter(m.reconciler_metrics_port, m.listen_address)
        except OSError as exc:
            log.error("%s", exc)
            return None

    def shutdown(self) -> None:
        """Stop the gateway first (no new requests), then the backends."""
        if not self.driver.outlives_supervisor:
            names = [r.name for r in self.driver.records()]
            for name in sorted(names, key=lambda n: n != GATEWAY_UNIT):
                self.driver.halt(name)
        for backend in read_marks(self.drainer.directory):  # a change not made: route to it again
            self.drainer.end(backend)
        self.write_status()  # systemd units outlive the reconciler: left running

    # -- status --------------------------------------------------------------------------
    def views(self) -> list[UnitView]:
        urls = {u: t[0] for u in [GATEWAY_UNIT, *map(backend_unit, self.desired.backends)]
                if (t := self._probe_target(u))}  # fmt: skip
        result = PassResult(
            self.last_actions, self.health, self.apply_failures, urls, self.placement.assignments
        )
        return unit_views(self.desired, self.driver.records(), result)

    def write_status(self) -> None:
        status = {
            "config": self.config or "embedded:default",
            "config_error": self.config_error,
            "updated_at": time.time(),
            "driver": self.driver.name,
            "writer": self.writer,
            "gateway": self._gateway_url(),
            "gpus": self.gpus.reason or "ok",
            "units": [v.__dict__ for v in self.views()],
            "admin_requests": [r.describe() for r in self.admin_requests.values()],
            "admin_request_problems": self.admin_problems,
        }
        write_atomic(self.state_dir / "status.json", json.dumps(status, indent=1))


def _declares_anything(path: Path) -> bool:
    """False for a file with nothing but blanks and comments (emptied or cut short)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # the loader names the problem
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())
