"""Commands that run and inspect a host: the reconciler, the gateway, their state."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

from reconciler.cli.common import (
    config_arg,
    driver_args,
    gateway_url,
    gpu_inventory,
    gpus_arg,
    load_state,
)
from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.references import file_problems
from reconciler.paths import state_dir
from reconciler.plan import ActionKind

log = logging.getLogger("tensorforge")


def cmd_validate(args: argparse.Namespace) -> int:
    state, source = load_desired_state(args.config)
    if not args.no_file_checks and (problems := file_problems(state)):
        raise ConfigError(source, problems)
    managed = sum(1 for b in state.backends.values() if b.managed)
    print(
        f"{source}: ok ({len(state.models)} model(s), {len(state.backends)} backend(s), "
        f"{managed} managed here)"
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller
    from reconciler.service import serve_foreground

    controller = Controller(args.config, driver=args.driver, run_gateway=not args.no_gateway)
    return serve_foreground(controller)


def cmd_server(args: argparse.Namespace) -> int:
    from reconciler.service import start_background, stop_background, wait_for_gateway

    state = load_state(args)
    directory = state_dir(state.state_dir)
    if args.action in ("stop", "restart"):
        stopped = stop_background(directory)
        print("stopped" if stopped else "no supervisor was running")
        if args.action == "stop":
            return 0
    if args.action == "status":
        return cmd_status(args)
    info = start_background(args.config, directory, args.log_level)
    if state.gateway.enable and args.wait:
        # With no backend declared, a gateway answering /health is all there is to wait for.
        wait_for_gateway(
            gateway_url(state), None, args.wait, info, need_backend=bool(state.backends)
        )
    print(f"supervisor running (pid {info.pid}); gateway {gateway_url(state)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.service import supervisor_info

    state = load_state(args)
    directory = state_dir(state.state_dir)
    info = supervisor_info(directory)
    try:
        status = json.loads((directory / "status.json").read_text())
    except (OSError, ValueError):
        status = {"units": []}
    status["supervisor"] = {"running": info is not None, "pid": info.pid if info else None}
    # Without a supervisor: systemd units run on under systemd, and what `apply` started runs
    # on by design; only what a supervisor that died left behind is orphaned.
    supervised = info is not None or status.get("driver") == "systemd"
    left_by = status.get("writer", "supervisor")
    if not supervised:
        running = _orphans(directory)
        for unit in status["units"]:
            unit["orphan_pid"] = running.get(unit["unit"])
    status["state_dir"] = str(directory)
    status["routing"] = _routing(state)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0 if supervised else 3
    sup = f"running (pid {info.pid})" if info else "not running"
    if info is None and status.get("driver") == "systemd":
        sup += " (systemd runs the units)"
    print(f"supervisor: {sup}   state: {directory}   gpus: {status.get('gpus', '?')}")
    if status.get("config_error"):
        print(f"desired state refused, the last good one stays in force:\n{status['config_error']}")
    rows = [("UNIT", "KIND", "MODEL", "PID", "HEALTH", "RESTARTS", "URL / DETAIL")]
    unsupervised = (
        "running (started by apply; unsupervised)"
        if left_by == "apply"
        else "orphaned: still running"
    )
    for unit in status["units"]:
        detail = unit["url"] + (f"  {unit['detail']}" if unit["detail"] else "")
        orphan = unit.get("orphan_pid")
        pid = str(unit["pid"]) if unit["pid"] and supervised else str(orphan) if orphan else "-"
        health = unit["health"] if supervised else unsupervised if orphan else "stopped"
        rows.append(
            (
                unit["unit"],
                unit["kind"],
                unit["model"] or "-",
                pid,
                health,
                str(unit["restarts"]),
                detail,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[6])
    _print_routing(status["routing"])
    return 0 if supervised else 3


def _routing(state) -> dict:
    """The gateway's routing table: what `auto` and the mapped names choose among."""
    from reconciler.gateway.router import RoutingTable

    try:
        return RoutingTable.from_state(state).describe()
    except ValueError as exc:  # an unreadable backend key file: status still answers
        return {"error": str(exc)}


def _print_routing(table: dict) -> None:
    if "error" in table:
        print(f"routing: {table['error']}")
        return
    aliases = ", ".join(f"{name} -> {target}" for name, target in table["model_aliases"].items())
    print(f"routing: no model -> {table['default_model']}; {aliases}")
    for name, b in table["backends"].items():
        context = (
            f"{b['context_per_request']} tokens/request"
            if b["context_per_request"]
            else "context unknown"
        )
        print(f"  {name}: {b['model']} ({b['kind']}), {context}; {', '.join(b['capabilities'])}")


def _orphans(directory: Path) -> dict[str, int]:
    """Units a dead supervisor left running (`server stop` ends them), by unit name -> pid."""
    from reconciler.drivers.process import ProcessDriver, process_alive

    if not (directory / "units").is_dir():
        return {}
    return {
        r.name: r.pid
        for r in ProcessDriver(directory).records()
        if r.pid is not None and process_alive(r.pid, r.start_ticks)
    }


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from reconciler.gateway.app import create_app
    from reconciler.gateway.server import header_timeout_protocol

    state = load_state(args)
    host = args.host or state.gateway.host
    port = args.port or state.gateway.port
    app = create_app(state, config_path=args.config)
    # Modules, configuration and the app live as long as the process: frozen out of the
    # garbage collector's sight, its collections stop walking them on behalf of each
    # request's short-lived objects (that walk was a third of the CPU per request).
    gc.freeze()
    uvicorn.run(
        app, host=host, port=port, log_level=args.log_level.lower(),
        access_log=False, timeout_graceful_shutdown=30, proxy_headers=False, http=header_timeout_protocol(),
        # A WebSocket message is a request body with an envelope: the same limit, not uvicorn's
        # 16 MiB default (the session also refuses what exceeds max_body_bytes).
        ws_max_size=state.gateway.max_body_bytes + 64 * 1024,
    )  # fmt: skip
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller

    unit_dir = Path(args.unit_dir) if args.unit_dir else None
    driver = args.driver or ("systemd" if unit_dir else None)
    controller = Controller(args.config, driver=driver, unit_dir=unit_dir, gpus=gpu_inventory(args))
    actions = controller.plan()
    for action in actions:
        print(action)
        if action.diff and not args.no_diff:
            print(action.diff.rstrip())
    if not actions:
        print("nothing to do: the running state matches the declaration")
    if any(a.kind == ActionKind.REFUSE for a in actions):
        return 1  # the declaration cannot be met on this host: apply would fail
    return 2 if actions else 0


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller

    unit_dir = Path(args.unit_dir) if args.unit_dir else None
    controller = Controller(
        args.config, driver=args.driver, unit_dir=unit_dir, gpus=gpu_inventory(args)
    )
    controller.writer = "apply"  # what it starts runs on after it exits, supervised by nobody
    started = time.monotonic()
    ok = controller.wait_healthy(args.timeout)
    state = controller.desired
    if ok and state.gateway.enable and any(b.managed for b in state.backends.values()):
        from reconciler.service import wait_for_gateway

        # The gateway probes backends on its own interval: done when it routes to them.
        remaining = max(args.timeout - (time.monotonic() - started), 5.0)
        try:
            wait_for_gateway(gateway_url(state), None, remaining, None)
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            ok = False
    for action in controller.last_actions:
        print(action)
    for unit, reason in controller.apply_failures.items():
        print(f"failed   {unit}: {reason}", file=sys.stderr)
    return 0 if ok else 1


def cmd_render(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller
    from reconciler.drivers.atomic import write_atomic
    from reconciler.units.render import reconciler_unit_spec, render_unit, unit_file_name

    out = Path(args.out)
    controller = Controller(args.config, driver="systemd", unit_dir=out, gpus=gpu_inventory(args))
    units = controller.desired_units()
    argv = [sys.executable, "-m", "reconciler.cli", "up", "--driver", "systemd"]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    spec = reconciler_unit_spec(argv, str(Path(args.config).resolve()) if args.config else None)
    refused = [u for u in units.values() if u.refused]
    for unit in refused:
        print(f"refused  {unit.name}: {unit.refused}", file=sys.stderr)
    if refused:
        # A unit set missing a declared backend is not the declaration: write none of it.
        print(f"error: nothing written to {out}; fix the refusals (or render with --gpus-from "
              "the target host's GPUs)", file=sys.stderr)  # fmt: skip
        return 1
    texts = {u.name: u.content for u in units.values()}
    texts["reconciler"] = render_unit(spec)
    for name, text in sorted(texts.items()):
        write_atomic(out / unit_file_name(name), text)
        print(out / unit_file_name(name))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a desired-state file; print every problem")
    config_arg(p, required=True)
    p.add_argument(
        "--no-file-checks", action="store_true",
        help="skip checking that the files it names (keys files, path: models) exist, as at build time",
    )  # fmt: skip
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("up", help="reconcile and serve the gateway in the foreground")
    config_arg(p)
    p.add_argument("--driver", choices=["auto", "systemd", "process"], default=None)
    p.add_argument(
        "--no-gateway", action="store_true",
        help="reconcile the backends only; the gateway runs as its own service (`tensorforge gateway`)",
    )  # fmt: skip
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("server", help="run `up` in the background: start|stop|restart|status")
    p.add_argument("action", choices=["start", "stop", "restart", "status"])
    p.add_argument(
        "--wait",
        type=float,
        default=300.0,
        help="seconds to wait for a healthy backend (0: do not wait)",
    )
    p.add_argument("--json", action="store_true", help="with status: machine-readable")
    config_arg(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("status", help="backends, their health and pids")
    p.add_argument("--json", action="store_true")
    config_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gateway", help="serve only the gateway (backends run elsewhere)")
    config_arg(p)
    p.add_argument("--host", help="listen address (default from the desired state)")
    p.add_argument("--port", type=int, help="listen port (default from the desired state)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("plan", help="show what apply would do (exit 0: nothing, 2: changes)")
    config_arg(p)
    p.add_argument("--no-diff", action="store_true")
    driver_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="reconcile once and wait until healthy")
    config_arg(p)
    p.add_argument("--timeout", type=float, default=300.0)
    driver_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("render", help="write the systemd units for a desired state, nothing else")
    config_arg(p)
    p.add_argument("--out", "-o", required=True, help="directory to write the unit files to")
    gpus_arg(p)
    p.set_defaults(func=cmd_render)
