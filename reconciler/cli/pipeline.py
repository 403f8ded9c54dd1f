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
from reconciler.extras import require_extra
from reconciler.paths import state_dir

log = logging.getLogger("tensorforge")


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.pipeline.run import Sampling, read_prompt_file, read_prompts, run_prompts
    from reconciler.service import start_background, stop_background, wait_for_gateway

    state = load_state(args)
    parallel = _positive_env("LLM_PARALLEL", 8)
    jobs = _prompts(args, read_prompts, read_prompt_file)
    if isinstance(jobs, str):
        print(f"error: {jobs}", file=sys.stderr)
        return 1
    prompts, names = jobs
    output = None if args.output in (None, "-") else Path(args.output)
    for target in [output] if output is not None else []:
        if not target.parent.is_dir():
            # Checked before any prompt is sent: answers are not thrown away at the end.
            print(
                f"error: --output {args.output}: directory {target.parent} does not exist",
                file=sys.stderr,
            )
            return 1
    requested = args.model or (
        next(iter(state.backends.values())).model if state.backends else None
    )
    if requested is None or requested not in state.model_names():
        print(
            f"error: model {requested!r} is not declared; known: {', '.join(state.model_names())}",
            file=sys.stderr,
        )
        return 1
    model = state.model_names()[requested]
    url = gateway_url(state)
    directory = state_dir(state.state_dir)
    sampling = Sampling(args.temperature, args.top_p, args.seed, args.system)
    started_here = False
    try:
        if not _gateway_serves(url, model):
            log.info("starting the backends and the gateway (stopped again afterwards)")
            info = start_background(args.config, directory, args.log_level)
            started_here = True
            wait_for_gateway(url, model, args.start_timeout, info)
        results = run_prompts(
            url, requested, prompts, args.max_tokens, parallel, os.environ.get("TF_API_KEY"), sampling=sampling,
        )  # fmt: skip
    finally:
        if started_here:
            stop_background(directory)
    failed = sum(1 for r in results if r["error"])
    if names is not None:  # --batch: one result file per prompt file, beside each other
        out_dir = Path(args.output_dir)
        for name, result in zip(names, results, strict=True):
            write_atomic(out_dir / f"{name}.json", _document(url, [result]) + "\n")
        print(
            f"wrote {len(results)} result(s) to {out_dir}/"
            + (f", {failed} failed" if failed else "")
        )
    if output is None and args.output == "-":
        print(_document(url, results))
    elif output is not None:
        write_atomic(output, _document(url, results) + "\n")
        print(
            f"wrote {len(results)} result(s) to {args.output}"
            + (f", {failed} failed" if failed else "")
        )
    return 1 if failed else 0


def _document(url: str, results: list[dict]) -> str:
    return json.dumps(
        {"created": time.time(), "gateway": url, "results": results}, indent=2, ensure_ascii=False
    )


def _prompts(
    args: argparse.Namespace, read_prompts, read_prompt_file
) -> tuple[list[str], list[str] | None] | str:
    """(prompts, result names for --batch or None), or what is wrong with the arguments."""
    prompts = [*(args.prompt_words or []), *(args.prompt or [])]
    try:
        if args.prompts_file:
            prompts += read_prompts(Path(args.prompts_file))
        if args.file:
            prompts.append(read_prompt_file(Path(args.file)))
        if args.batch:
            if not args.output_dir:
                return "--batch DIR writes one result per prompt file: give --output-dir DIR too"
            files = sorted(Path(args.batch).glob("*.txt"))
            if not Path(args.batch).is_dir() or not files:
                return f"--batch {args.batch}: not a directory with *.txt prompt files"
            if prompts:
                return "--batch takes its prompts from the directory only; drop the other prompts"
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            return [read_prompt_file(f) for f in files], [f.stem for f in files]
    except ValueError as exc:
        return str(exc)
    if not prompts:
        return 'give a prompt: tensorforge run "TEXT" (or --prompt TEXT, --file FILE, --prompts-file FILE, --batch DIR)'
    if args.output is None:
        return (
            "give --output FILE for the results ('-' for stdout), or --batch DIR --output-dir DIR"
        )
    return prompts, None


def _positive_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{name}={value!r}: must be a whole number of at least 1 (default {default})"
        )
    return int(value)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give a number of seconds above 0, for example --watch 5"
        )
    return seconds


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
    empty = f"{args.input}: no results in it; give a file `tensorforge run` (or llama-server) wrote"
    if args.output:
        # Into a temporary file renamed at the end: a file exported onto itself stays intact
        # while it is read, and a failure half-way leaves the old output, not half of one.
        with atomic_output(Path(args.output), newline="") as out:
            count = export(results, args.format, out)
            if count == 0:
                raise ValueError(empty)  # leaves no output file behind
        print(f"exported {count} result(s) to {args.output}", file=sys.stderr)
    elif export(results, args.format, sys.stdout) == 0:
        raise ValueError(empty)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from reconciler.gpu.inventory import NvmlInventory
    from reconciler.pipeline.health import collect, render

    state = load_state(args)
    urls = {f"llamacpp-url{i or ''}": u for i, u in enumerate(args.llamacpp_url or [])}
    while True:
        report = collect(
            state, args.gateway or gateway_url(state), NvmlInventory(), args.requests,
            args.concurrency, args.max_tokens, urls, os.environ.get("TF_API_KEY"),
            gateway_expected=state.gateway.enable or args.gateway is not None,
        )  # fmt: skip
        print(json.dumps(report.to_dict(), indent=1) if args.json else render(report), flush=True)
        if args.watch is None:
            return 0 if report.ok else 1
        time.sleep(args.watch)  # Ctrl-C ends it (the CLI answers KeyboardInterrupt)


def cmd_analyze(args: argparse.Namespace) -> int:
    require_extra("analyze", "tensorforge analyze")  # before reading the state or the tree
    from reconciler.analyze.command import execute

    state = load_state(args)
    return execute(args, state, gateway_url(state))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer prompts through the gateway and write JSON results")
    p.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="a prompt (several: one each)")
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a file whose whole text is one prompt")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument(
        "--batch",
        metavar="DIR",
        help="one prompt per DIR/*.txt, one result per file in --output-dir",
    )
    p.add_argument("--output-dir", help="where --batch writes NAME.json for each NAME.txt")
    p.add_argument("--output", "-o", help="result file ('-' for stdout)")
    p.add_argument("--model", "-m", help="model name or alias (default: the first backend's)")
    p.add_argument("--system", help="a system prompt sent before each prompt")
    # --n-predict and --temp: the earlier scripts' (llama.cpp's) names.
    p.add_argument("--max-tokens", "--n-predict", type=int, default=256)
    p.add_argument(
        "--temperature",
        "--temp",
        type=float,
        default=0.1,
        help="sampling temperature (default 0.1: reproducible batch answers)",
    )
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--start-timeout", type=float, default=300.0)
    config_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="turn run results into md, txt, jsonl or csv")
    p.add_argument("--input", "-i", required=True)
    p.add_argument(
        "--format", "-f", required=True, choices=["md", "txt", "jsonl", "csv", "markdown", "text"]
    )
    p.add_argument("--output", "-o", help="default: stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "health", help="GPUs, backend health and a latency benchmark through the gateway"
    )
    p.add_argument("--gateway", help="gateway URL (default from the desired state)")
    p.add_argument(
        "--requests", "-n", type=int, default=5, help="benchmark requests per model (0: none)"
    )
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--llamacpp-url", action="append", help="also probe and measure this llama.cpp server"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--watch", type=_positive_seconds, metavar="N", help="repeat every N seconds until Ctrl-C"
    )
    config_arg(p)
    p.set_defaults(func=cmd_health)

    from reconciler.analyze.command import configure as configure_analyze

    p = sub.add_parser(
        "analyze", help="map a source tree (modules, imports, cycles) and summarize it with a model"
    )
    configure_analyze(p)
    config_arg(p)
    p.set_defaults(func=cmd_analyze)
