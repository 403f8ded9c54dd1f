"""`tensorforge`: the command line. Each command is a thin layer over a module that does the
work, so the same things can be driven from tests and from the NixOS services. Commands are
grouped by concept: `host` (reconciler, gateway, state), `models`, `pipeline`, `monitoring`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from reconciler.cli import host, models, monitoring, pipeline
from reconciler.cli.common import describe_os_error
from reconciler.config.loader import ConfigError

log = logging.getLogger("tensorforge")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(LOG_LEVELS)} (also TF_LOG_LEVEL)"
        )
    return value.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorforge",
        description="Declarative LLM inference: keep backends running as declared, route through one gateway.",
    )
    parser.add_argument(
        "--log-level", type=log_level, default=os.environ.get("TF_LOG_LEVEL", "INFO")
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (host, models, pipeline, monitoring):
        group.register(sub)
    return parser


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
    except TimeoutError as exc:  # an OSError too, but no file is involved
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI reports; the traceback goes to the log at debug level
        log.debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
