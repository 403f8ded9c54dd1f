"""`tensorforge analyze`: structure first (always), then summaries (when a model answers),
then the report files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from reconciler.analyze.progress import Progress
from reconciler.analyze.report import build_report, render_markdown, structural_facts
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import SummaryOptions, skipped_summaries, summarize


def analyze(root: Path, options: SummaryOptions | None, progress_enabled: bool = True) -> dict:
    """The report document; `options=None` leaves the model out entirely."""
    started = time.monotonic()
    structure = analyze_structure(root)
    structure_s = time.monotonic() - started
    graph = structure.graph
    progress = Progress(len(graph.modules), enabled=progress_enabled)
    progress.note(
        f"{len(structure.files)} files, {len(graph.modules)} modules, {len(graph.edges)} dependencies, "
        f"{len(graph.cycles())} cycle(s) in {structure_s:.2f}s"
    )
    if options is None:
        summaries = skipped_summaries(graph, "", "", "summaries not requested (--no-summaries)")
    else:
        summaries = summarize(graph, structural_facts(structure), options, progress)
    timings = {
        "structure_s": round(structure_s, 3),
        "summaries_s": summaries.seconds,
        "total_s": round(time.monotonic() - started, 2),
    }
    return build_report(structure, summaries, timings)


def write_report(report: dict, markdown: Path | None, json_path: Path | None) -> None:
    # A file name that is not UTF-8 reaches us with surrogate escapes (PEP 383); written as
    # `\udce9` it stays readable and the report valid, instead of failing the whole run.
    if markdown is not None:
        markdown.write_text(render_markdown(report), encoding="utf-8", errors="backslashreplace")
    if json_path is not None:
        json_path.write_text(
            json.dumps(report, indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8",
            errors="backslashreplace",
        )
