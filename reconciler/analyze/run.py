"""`tensorforge analyze`: the gateway asked first (so a run that cannot get summaries fails
before any work), then the structure, the summaries (unless --no-summaries) and the report
files, written atomically. `check_writable` is for the command line to call before all that."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from reconciler.analyze.progress import Progress
from reconciler.analyze.report import build_report, render_markdown, structural_facts
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import SummaryOptions, connect, skipped_summaries, summarize
from reconciler.drivers.atomic import write_atomic


def check_writable(path: Path, option: str) -> None:
    """Create and remove a file next to `path`: the only check that holds for root, read-only
    mounts and full disks alike. ValueError names the option and the fix."""
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    directory = path.parent
    if not directory.is_dir():
        raise ValueError(f"{option} {path}: directory {directory} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as exc:
        raise ValueError(
            f"{option} {path}: cannot write in {directory} ({exc.strerror or exc}); choose a writable place"
        ) from None


def analyze(
    root: Path,
    options: SummaryOptions | None,
    progress_enabled: bool = True,
    include_tests: bool = False,
) -> dict:
    """The report document; `options=None` leaves the model out entirely. Raises
    GatewayError before the walk when the gateway cannot give summaries."""
    started = time.monotonic()
    connection = connect(options) if options is not None else None
    walked = time.monotonic()
    structure = analyze_structure(root)
    structure_s = time.monotonic() - walked
    graph = structure.graph
    progress = Progress(len(graph.modules), enabled=progress_enabled)
    progress.note(
        f"{len(structure.files)} files, {len(graph.modules)} modules, {len(graph.edges)} dependencies, "
        f"{len(graph.cycles())} cycle(s) in {structure_s:.2f}s"
    )
    if options is None:
        summaries = skipped_summaries(graph, "", "", "summaries not requested (--no-summaries)")
    else:
        facts = structural_facts(structure)
        summaries = summarize(graph, facts, options, progress, connection)
    timings = {
        "structure_s": round(structure_s, 3),
        "summaries_s": summaries.seconds,
        "total_s": round(time.monotonic() - started, 2),
    }
    return build_report(structure, summaries, timings, include_tests)


def write_report(report: dict, markdown: Path | None, json_path: Path | None) -> None:
    # A file name that is not UTF-8 reaches us with surrogate escapes (PEP 383); written as
    # `\udce9` it stays readable and the report valid, instead of failing the whole run.
    # Atomic: an interrupted run leaves the previous report, not half of a new one.
    if markdown is not None:
        write_atomic(markdown, _printable(render_markdown(report)))
    if json_path is not None:
        write_atomic(json_path, _printable(json.dumps(report, indent=1, ensure_ascii=False) + "\n"))


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
