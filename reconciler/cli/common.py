"""Pieces every command group shares: the --config and --driver options, loading the desired
state, and the gateway's URL."""

from __future__ import annotations

import argparse

from reconciler.config.loader import load_desired_state
from reconciler.config.schema import DesiredState, reach


def config_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config", "-c", required=required,
        help="desired-state file (YAML or JSON); default: the embedded CPU default",
    )  # fmt: skip


def load_state(args: argparse.Namespace) -> DesiredState:
    state, _ = load_desired_state(args.config)
    return state


def gateway_url(state: DesiredState) -> str:
    return f"http://{reach(state.gateway.host, state.gateway.port)}"


def driver_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--driver", choices=["auto", "systemd", "process"], default=None,
        help="how units run (default: systemd when it is PID 1 and units are writable)",
    )  # fmt: skip
    parser.add_argument(
        "--unit-dir", help="systemd unit directory (default /etc/systemd/system); implies systemd",
    )  # fmt: skip
    gpus_arg(parser)


def gpus_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus-from", metavar="FILE",
        help="plan against the GPUs in this JSON file instead of NVML (e.g. a B200 node's)",
    )  # fmt: skip


def gpu_inventory(args: argparse.Namespace):
    """The inventory --gpus-from names, or None for the real one (NVML)."""
    from reconciler.gpu.inventory import load_inventory

    return load_inventory(args.gpus_from) if getattr(args, "gpus_from", None) else None


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
