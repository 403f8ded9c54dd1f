"""The `tensorforge analyze` command line: options, defaults taken from the desired state
(gateway address, the model's context per request slot), and the files it writes."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="root of the source tree to analyze")
    parser.add_argument(
        "--output", "-o", default="analysis.md", help="Markdown report (default: analysis.md)"
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument(
        "--model", "-m", default="smollm2", help="model name or alias (default: smollm2)"
    )
    parser.add_argument("--gateway", help="gateway URL (default: the gateway of the desired state)")
    parser.add_argument(
        "--api-key", help="API key for a gateway with keys on (default: $TF_API_KEY)"
    )
    parser.add_argument(
        "--summarize", default="source,example,bench", metavar="KINDS",
        help="kinds of file to summarize: source, test, example, bench or all "
        "(default: source,example,bench; tests are not summarized)",
    )  # fmt: skip
    parser.add_argument(
        "--include-tests", action="store_true", help="draw test modules in the diagram too"
    )
    parser.add_argument(
        "--context-tokens", type=int,
        help="tokens one request may use (default: from /v1/models, else the declared backend's "
        "context_size / parallel, else 2048)",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=int, default=96, help="answer tokens per module summary"
    )
    parser.add_argument(
        "--overview-tokens", type=int, default=256, help="answer tokens for the overview"
    )
    parser.add_argument(
        "--parallel", type=int, default=2, help="requests in flight at once (default 2)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per request")
    parser.add_argument(
        "--no-summaries", action="store_true", help="structure only; do not ask a model"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def declared_context(state, model: str) -> int | None:
    """Tokens per request slot of the declared backends serving the model (the smallest)."""
    name = state.model_names().get(model)
    slots = [
        b.context_size // b.parallel for b in state.backends.values() if name and b.model == name
    ]
    return min(slots) if slots else None


def describe_model(state, model: str) -> str:
    """`smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf, about 135M parameters)`: what the caution
    above the summaries names. The size comes from the declared file's name, when it says."""
    spec = state.models.get(state.model_names().get(model, ""))
    if spec is None:
        return f"{model} (not declared here; its size is unknown)"
    source = spec.file or spec.source.partition(":")[2]
    size = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([MB])(?![a-zA-Z])", source, re.IGNORECASE)
    parameters = f"about {size[1]}{size[2].upper()} parameters" if size else "size not stated"
    return f"{model} ({source}, {parameters})"


def _readable_directory(root: Path) -> str | None:
    """Why `root` cannot be analysed, or None."""
    if not root.is_dir():
        return f"{root}: not a directory; give the root of a source tree"
    try:
        os.listdir(root)
    except OSError as exc:  # not a write problem: say so (it once read "cannot write")
        return f"{root}: cannot read the directory ({exc.strerror or exc}); check its permissions"
    return None


def execute(args: argparse.Namespace, state, gateway_url: str) -> int:
    # Imported here: `tensorforge --help` should not pay for openai and the parsers.
    from reconciler.analyze.client import GatewayError
    from reconciler.analyze.kinds import parse_kinds
    from reconciler.analyze.run import analyze, check_writable, write_report
    from reconciler.analyze.summarize import SummaryOptions

    for noisy in ("httpx", "httpx2", "openai"):  # one log line per request drowns the progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(args.path)
    problem = _readable_directory(root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    output = None if args.output == "-" else Path(args.output)
    json_path = Path(args.json) if args.json else None
    try:  # before any work: a report that cannot be written is found now, not after an hour
        for path, option in ((output, "--output"), (json_path, "--json")):
            if path is not None:
                check_writable(path, option)
        kinds = parse_kinds(args.summarize)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = None
    if not args.no_summaries:
        options = SummaryOptions(
            gateway=(args.gateway or gateway_url).rstrip("/"),
            model=args.model,
            context_tokens=args.context_tokens,
            timeout=args.timeout,
            max_tokens=args.max_tokens,
            overview_tokens=args.overview_tokens,
            parallel=max(1, args.parallel),
            api_key=args.api_key or os.environ.get("TF_API_KEY") or None,
            kinds=kinds,
            model_description=describe_model(state, args.model),
        )
        if options.context_tokens is None and args.gateway is None:
            options.fallback_context_tokens = declared_context(state, args.model)
        if options.context_tokens is not None:  # refused now, not after walking the tree
            from reconciler.analyze.summarize import budgets

            try:
                budgets(options.context_tokens, options)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
    try:
        report = analyze(root, options, not args.quiet, args.include_tests)
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_report(report, output, json_path)
    if output is None:
        from reconciler.analyze.report import render_markdown

        sys.stdout.write(render_markdown(report))
    counts = report["summaries"]["counts"]
    totals = report["totals"]
    written = ", ".join(str(p) for p in (output, args.json) if p)
    print(
        f"analyzed {totals['modules']} modules ({totals['edges']} dependencies, {totals['cycles']} cycles) "
        f"in {report['timings']['total_s']:.1f}s; summaries: {counts['summarized']} summarized, "
        f"{counts['skipped']} skipped, {counts['failed']} failed"
        + _not_covered(report)
        + (f"; wrote {written}" if written else ""),
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


def _not_covered(report: dict) -> str:
    """What the graph lacks, said where the run ends too (details in the report)."""
    parts = [f"{len(report['left_out'])} file(s) left out"] if report["left_out"] else []
    if report["unresolved"]:
        parts.append(f"{len(report['unresolved'])} unresolved import(s)")
    parts += [
        f"{name} not parsed ({n} file{'s' if n != 1 else ''})"
        for name, n in report["not_parsed"].items()
    ]
    return f"; not covered: {', '.join(parts)}" if parts else ""
