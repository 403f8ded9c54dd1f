"""The pipeline commands: run prompts, export results, measure health, analyze code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from reconciler.cli.common import config_arg, gateway_url, load_state
from reconciler.drivers.atomic import atomic_output, write_atomic
from reconciler.paths import state_dir

log = logging.getLogger("tensorforge")


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.pipeline.run import read_prompts, run_prompts
    from reconciler.service import start_background, stop_background, wait_for_gateway

    state = load_state(args)
    parallel = _positive_env("LLM_PARALLEL", 8)
    output = None if args.output == "-" else Path(args.output)
    if output is not None and not output.parent.is_dir():
        # Checked before any prompt is sent: answers are not thrown away at the end.
        print(f"error: --output {args.output}: directory {output.parent} does not exist", file=sys.stderr)
        return 1
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
    url = gateway_url(state)
    directory = state_dir(state.state_dir)
    started_here = False
    try:
        if not _gateway_serves(url, model):
            log.info("starting the backends and the gateway (stopped again afterwards)")
            info = start_background(args.config, directory, args.log_level)
            started_here = True
            wait_for_gateway(url, model, args.start_timeout, info)
        results = run_prompts(
            url, requested, prompts, args.max_tokens, parallel, os.environ.get("TF_API_KEY"),
        )  # fmt: skip
    finally:
        if started_here:
            stop_background(directory)
    document = {"created": time.time(), "gateway": url, "results": results}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if output is None:
        print(text)
    else:
        write_atomic(output, text + "\n")
        failed = sum(1 for r in results if r["error"])
        print(f"wrote {len(results)} result(s) to {args.output}" + (f", {failed} failed" if failed else ""))
    return 1 if any(r["error"] for r in results) else 0


def _positive_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: must be a whole number of at least 1 (default {default})")
    return int(value)


def _gateway_serves(url: str, model: str) -> bool:
    import httpx

    try:
        health = httpx.get(f"{url}/health", timeout=1).json()
        return any(b["healthy"] and b["model"] == model for b in health["backends"].values())
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


def cmd_export(args: argparse.Namespace) -> int:
    from reconciler.pipeline.export import export, iter_results

    results = iter_results(Path(args.input))
    if args.output:
        # Into a temporary file renamed at the end: a file exported onto itself stays intact
        # while it is read, and a failure half-way leaves the old output, not half of one.
        with atomic_output(Path(args.output), newline="") as out:
            count = export(results, args.format, out)
        print(f"exported {count} result(s) to {args.output}", file=sys.stderr)
    else:
        export(results, args.format, sys.stdout)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.pipeline.health import collect, render

    state = load_state(args)
    urls = {f"llamacpp-url{i or ''}": u for i, u in enumerate(args.llamacpp_url or [])}
    report = collect(
        state, args.gateway or gateway_url(state), NvmlInventory(), args.requests,
        args.concurrency, args.max_tokens, urls, os.environ.get("TF_API_KEY"),
        gateway_expected=state.gateway.enable or args.gateway is not None,
    )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0 if report.ok else 1


def cmd_analyze(args: argparse.Namespace) -> int:
    from reconciler.analyze.command import execute

    state = load_state(args)
    return execute(args, state, gateway_url(state))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer prompts through the gateway and write JSON results")
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--output", "-o", required=True, help="result file ('-' for stdout)")
    p.add_argument("--model", "-m", help="model name or alias (default: the first backend's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--start-timeout", type=float, default=300.0)
    config_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="turn run results into md, txt, jsonl or csv")
    p.add_argument("--input", "-i", required=True)
    p.add_argument("--format", "-f", required=True, choices=["md", "txt", "jsonl", "csv"])
    p.add_argument("--output", "-o", help="default: stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("health", help="GPUs, backend health and a latency benchmark through the gateway")
    p.add_argument("--gateway", help="gateway URL (default from the desired state)")
    p.add_argument("--requests", "-n", type=int, default=5, help="benchmark requests per model (0: none)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--llamacpp-url", action="append", help="also probe and measure this llama.cpp server")
    p.add_argument("--json", action="store_true")
    config_arg(p)
    p.set_defaults(func=cmd_health)


    from reconciler.analyze.command import configure as configure_analyze

    p = sub.add_parser("analyze", help="map a source tree (modules, imports, cycles) and summarize it with a model")
    configure_analyze(p)
    config_arg(p)
    p.set_defaults(func=cmd_analyze)
