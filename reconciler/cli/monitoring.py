"""Monitoring commands: Prometheus configuration and the GPU exporter."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from reconciler.cli.common import config_arg, load_state
from reconciler.paths import state_dir

log = logging.getLogger("tensorforge")


def duration(value: str) -> str:
    """argparse type: a Prometheus duration, refused with the schema's own message."""
    from reconciler.config.schema import check_duration

    try:
        return check_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_monitoring_config(args: argparse.Namespace) -> int:
    from reconciler.monitoring.prometheus import scrape_key_warning, write_bundle

    state = load_state(args)
    warning = scrape_key_warning(state)
    if warning:
        log.warning("%s: %s", args.config or "embedded default", warning)
    written = write_bundle(state, Path(args.out), args.scrape_interval)
    for path in written:
        print(path)
    return 0


def cmd_gpu_exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.monitoring.gpu_exporter import placement_from_state, serve

    state = load_state(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    status = state_dir(state.state_dir) / "status.json"
    port = args.port or state.monitoring.gpu_exporter_port
    host = args.host or state.monitoring.listen_address
    serve(NvmlInventory(), placement_from_state(state, status), host, port, stop)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitoring-config",
        help="write prometheus.yml, alert rules and Grafana dashboards to a directory",
    )
    config_arg(p)
    p.add_argument("--out", "-o", required=True, help="directory to write into")
    p.add_argument(
        "--scrape-interval", type=duration, help="override monitoring.scrape_interval (e.g. 5s)"
    )
    p.set_defaults(func=cmd_monitoring_config)

    p = sub.add_parser("gpu-exporter", help="serve GPU metrics for Prometheus (zero GPUs is fine)")
    config_arg(p)
    p.add_argument("--host", help="listen address (default monitoring.listen_address)")
    p.add_argument("--port", type=int, help="listen port (default monitoring.gpu_exporter_port)")
    p.set_defaults(func=cmd_gpu_exporter)
