"""The `tensorforge analyze` command line: options, defaults taken from the desired state
(gateway address, the model's context per request slot), and the files it writes."""

from __future__ import annotations

import argparse
import logging
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


def execute(args: argparse.Namespace, state, gateway_url: str) -> int:
    # Imported here: `tensorforge --help` should not pay for openai and the parsers.
    from reconciler.analyze.run import analyze, write_report
    from reconciler.analyze.summarize import SummaryOptions

    for noisy in ("httpx", "httpx2", "openai"):  # one log line per request drowns the progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(args.path)
    if not root.is_dir():
        print(f"error: {root}: not a directory; give the root of a source tree", file=sys.stderr)
        return 1
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
    report = analyze(root, options, progress_enabled=not args.quiet)
    output = None if args.output == "-" else Path(args.output)
    write_report(report, output, Path(args.json) if args.json else None)
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
        + (f"; wrote {written}" if written else ""),
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0
