"""The report: one JSON document built from the structure and the summaries, and the
Markdown rendering of that same document (so the two can never disagree)."""

from __future__ import annotations

import time
from collections import Counter

from reconciler.analyze.graph import Graph
from reconciler.analyze.kinds import file_kind
from reconciler.analyze.mermaid import mermaid
from reconciler.analyze.structure import Structure
from reconciler.analyze.summarize import Summaries

REPORT_VERSION = 2  # 2: type-only edges and cycles, left_out, unresolved, not_parsed
TOP = 10


def structural_facts(structure: Structure) -> str:
    """A few lines about the graph, given to the model with the overview prompts."""
    g = structure.graph
    languages = ", ".join(
        f"{k} ({v.files} files)" for k, v in structure.languages.items() if v.parsed
    )
    entries = [g.names[p] for p, r in g.entry_points.items() if len(r) > 1 or "nothing" not in r[0]]
    hubs = sorted(g.modules, key=lambda p: (-g.fan_in(p), p))[:5]
    lines = [
        f"Repository `{structure.root.name}`: {len(g.modules)} modules in {languages}.",
        "Entry points: " + (", ".join(entries[:10]) or "none found") + ".",
        "Most imported modules: " + ", ".join(f"{g.names[p]} ({g.fan_in(p)})" for p in hubs) + ".",
    ]
    if g.cycles():
        lines.append(f"Import cycles: {len(g.cycles())}.")
    return "\n".join(lines)


def _module_entry(g: Graph, path: str, summaries: Summaries) -> dict:
    module = g.modules[path]
    summary = summaries.modules.get(path)
    written = summary is not None and summary.status == "summarized"
    return {
        "path": path,
        "name": g.names[path],
        "kind": file_kind(path),
        "language": module.language,
        "lines": module.lines,
        "definitions": [
            {"kind": d.kind, "name": d.name, "line": d.line} for d in module.definitions
        ],
        "imports": g.successors(path),
        "imported_by": g.predecessors(path),
        "external": g.external.get(path, []),
        "fan_in": g.fan_in(path),
        "fan_out": g.fan_out(path),
        "entry_point": g.entry_points.get(path),
        "errors": module.errors,
        "summary": {
            "status": summary.status if summary else "skipped",
            "text": summary.text if summary else None,
            "reason": (summary.reason if summary else "not requested"),
            "chunks": summary.chunks if summary else 0,
            "truncated": summary.truncated if summary else False,
            "seconds": summary.seconds if summary else 0.0,
            "model": summaries.model if written else None,  # who wrote it: not a fact
        },
    }


def build_report(
    structure: Structure,
    summaries: Summaries,
    timings: dict[str, float],
    include_tests: bool = False,
) -> dict:
    g = structure.graph
    diagram = mermaid(g, include_tests=include_tests)
    statuses = Counter(s.status for s in summaries.modules.values())
    external = Counter(name for names in g.external.values() for name in names)
    return {
        "tool": "tensorforge analyze",
        "version": REPORT_VERSION,
        "root": str(structure.root),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings": timings,
        "totals": {
            "files": len(structure.files),
            "modules": len(g.modules),
            "edges": len(g.edges),
            "cycles": len(g.cycles()),
            "type_only_edges": sum(1 for e in g.edges if g.type_only(e)),
            "type_only_cycles": len(g.type_only_cycles()),
            "lines": sum(m.lines for m in g.modules.values()),
            "left_out": len(structure.left_out),
            "unresolved": len(g.unresolved),
        },
        "languages": {
            name: {"files": t.files, "lines": t.lines, "parsed": t.parsed}
            for name, t in structure.languages.items()
        },
        "not_parsed": structure.not_parsed(),  # code languages present but not parsed
        "left_out": [{"path": f.path, "reason": f.reason} for f in structure.left_out],
        "unresolved": [
            {"from": u.source, "import": u.target, "line": u.line, "reason": u.reason}
            for u in g.unresolved
        ],
        "modules": [_module_entry(g, path, summaries) for path in g.modules],
        "edges": [
            {
                "from": s,
                "to": t,
                "kinds": sorted({ref.kind for ref in refs}),
                "lines": sorted({ref.line for ref in refs}),
                "type_only": g.type_only((s, t)),
            }
            for (s, t), refs in sorted(g.edges.items())
        ],
        "cycles": [{"modules": c, "example": g.cycle_path(c)} for c in g.cycles()],
        # Loops that exist only through type-only imports: no import order problem at run time.
        "type_only_cycles": [
            {"modules": c, "example": g.cycle_path(c, runtime=False)} for c in g.type_only_cycles()
        ],
        "entry_points": [
            {"path": p, "name": g.names[p], "reasons": r} for p, r in g.entry_points.items()
        ],
        "largest": [
            {"path": p, "lines": g.modules[p].lines}
            for p in sorted(g.modules, key=lambda p: (-g.modules[p].lines, p))[:TOP]
        ],
        "most_connected": [
            {"path": p, "fan_in": g.fan_in(p), "fan_out": g.fan_out(p)}
            for p in sorted(g.modules, key=lambda p: (-(g.fan_in(p) + g.fan_out(p)), p))[:TOP]
        ],
        "external": dict(sorted(external.items(), key=lambda item: (-item[1], item[0]))),
        "mermaid": diagram.text,
        "mermaid_left_out": diagram.isolated,  # modules without any dependency
        "mermaid_edges_left_out": diagram.edges_left_out,  # past the diagram's limit
        "mermaid_modules_left_out": diagram.modules_left_out,  # every edge past the limit
        "mermaid_level": diagram.level,  # modules, or directories for a large tree
        "mermaid_depth": diagram.depth,
        "mermaid_tests_left_out": diagram.tests_left_out,
        "summaries": {
            "status": summaries.status,
            "reason": summaries.reason,
            "gateway": summaries.gateway,
            "model": summaries.model,
            "model_description": summaries.model_description,
            "caution": caution(summaries) if summaries.status == "done" else None,
            "context_tokens": summaries.context_tokens,
            "context_source": summaries.context_source,
            "counts": {k: statuses.get(k, 0) for k in ("summarized", "skipped", "failed")},
            "overview": summaries.overview,
            "overview_reason": summaries.overview_reason,
            "seconds": summaries.seconds,
        },
    }


def caution(summaries: Summaries) -> str:
    """Said above every model-written text: what wrote it, and how far to trust it."""
    who = summaries.model_description or summaries.model
    return (
        f"The overview and the module summaries were written by the language model {who}, "
        "not derived from the code: a small model writes fluent text that can be vague, wrong "
        "or invented. Treat them as a first draft and check them against the source; every "
        "other section of this report is computed from the code."
    )


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _prose(text: str) -> str:
    """Markdown would read __main__ as bold; escape what it treats as emphasis."""
    return text.replace("_", "\\_").replace("*", "\\*")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cycle(c: dict, names: dict[str, str]) -> str:
    loop = " → ".join(_code(names[p]) for p in c["example"])
    if len(c["example"]) - 1 < len(c["modules"]):
        members = ", ".join(_code(names[p]) for p in c["modules"])
        return f"- {len(c['modules'])} modules ({members}), for example {loop}"
    return f"- {len(c['modules'])} modules: {loop}"


def _coverage(report: dict) -> list[str]:
    """What the graph does not cover: languages without a parser, files left out, imports
    that name something of the tree but found nothing."""
    out = ["", "## Not covered", ""]
    not_parsed = report.get("not_parsed") or {}
    left_out, unresolved = report.get("left_out") or [], report.get("unresolved") or []
    if not (not_parsed or left_out or unresolved):
        return [*out, "Every file was read and every import within the tree resolved."]
    if not_parsed:
        listed = ", ".join(f"{k} ({v} file{'s' if v != 1 else ''})" for k, v in not_parsed.items())
        out.append(
            f"**Not parsed** (no parser for these languages; their imports are not in the graph): {listed}."
        )
        out.append("")
    if left_out:
        out += [f"**Files left out** ({len(left_out)}):", ""]
        out += [f"- {_code(f['path'])}: {f['reason']}" for f in left_out]
        out.append("")
    if unresolved:
        out += [f"**Unresolved imports** ({len(unresolved)}):", ""]
        if any(f["path"].endswith("/") for f in left_out):
            out += ["Imports of modules inside the directories left out above appear here too.", ""]
        out += [
            f"- {_code(u['from'])} line {u['line']}: {_code(u['import'])}: {u['reason']}"
            for u in unresolved
        ]
    return out


def _overview(s: dict) -> list[str]:
    out = ["", "## Architecture overview (written by a model)", ""]
    if s.get("caution"):
        out += [f"> **Caution:** {s['caution']}", ""]
    if s["overview"]:
        out.append(f"{s['overview']}")
        out += [
            "",
            f"_Written by {_code(s['model'])} through {s['gateway']} ({s['context_tokens']} tokens of context, {s['context_source']})._",
        ]
    else:
        out.append(f"_Skipped: {s['overview_reason'] or s['reason']}._")
    counts = s["counts"]
    out.append("")
    out.append(
        f"Module summaries: {counts['summarized']} summarized, {counts['skipped']} skipped, {counts['failed']} failed."
    )
    return out


def render_markdown(report: dict) -> str:
    names = {m["path"]: m["name"] for m in report["modules"]}
    totals, s = report["totals"], report["summaries"]
    out = [f"# Analysis of {_code(report['root'])}", ""]
    out.append(
        f"{totals['files']} files, {totals['modules']} modules parsed ({totals['lines']} lines), "
        f"{totals['edges']} dependencies, {totals['cycles']} import cycle(s)"
        + (
            f" (and {totals['type_only_cycles']} through type-only imports only). "
            if totals.get("type_only_cycles")
            else ". "
        )
        + f"Generated {report['generated']} by `tensorforge analyze` in {report['timings'].get('total_s', 0):.1f}s."
    )
    out += _coverage(report)
    out += [
        "",
        "## Languages",
        "",
        "| language | files | lines | parsed |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, t in report["languages"].items():
        out.append(f"| {name} | {t['files']} | {t['lines']} | {'yes' if t['parsed'] else ''} |")
    out += ["", "## Dependency graph", ""]
    if report["edges"]:
        if report.get("mermaid_level") == "directories":
            out.append(
                f"{totals['modules']} modules are too many to draw one by one: one node per "
                f"directory (first {report['mermaid_depth']} path segment(s)), each arrow "
                "labelled with the number of module dependencies behind it.\n"
            )
        if totals.get("type_only_edges"):
            out.append(
                "Dashed arrows are type-only imports (`if TYPE_CHECKING:`, `import type`).\n"
            )
        out += ["```mermaid", report["mermaid"], "```"]
        if report.get("mermaid_tests_left_out"):
            out.append(
                f"\n{report['mermaid_tests_left_out']} test module(s) are not drawn "
                "(`--include-tests` draws them)."
            )
        if report["mermaid_left_out"]:
            out.append(
                f"\n{report['mermaid_left_out']} module(s) without any dependency are not drawn."
            )
        cut = report.get("mermaid_edges_left_out", 0)
        if cut:  # past Mermaid's limit; cycles and entry points were kept first
            total, modules = len(report["edges"]), report.get("mermaid_modules_left_out", 0)
            note = (
                f"\nThe diagram draws {total - cut} of {total} dependencies (those inside "
                f"import cycles and from entry points first); {cut} are left out"
            )
            if modules:
                note += f", and with them {modules} module(s) none of whose dependencies is drawn"
            out.append(note + ".")
    else:
        out.append("_No module imports another._")
    out += ["", "## Entry points", ""]
    if not report["entry_points"]:
        out.append("None found: every module is imported by another.")
    for e in report["entry_points"]:
        reasons = "; ".join(_prose(r) for r in e["reasons"])
        out.append(f"- {_code(e['name'])} ({_code(e['path'])}): {reasons}")
    out += ["", "## Import cycles", ""]
    if not report["cycles"]:
        out.append("None at run time.")
    out += [_cycle(c, names) for c in report["cycles"]]
    if report.get("type_only_cycles"):
        out += [
            "",
            "Through type-only imports only (no import-order problem at run time):",
            "",
            *(_cycle(c, names) for c in report["type_only_cycles"]),
        ]
    out += ["", "## Largest modules", "", "| module | path | lines |", "| --- | --- | ---: |"]
    out += [
        f"| {_cell(names[m['path']])} | {_code(m['path'])} | {m['lines']} |"
        for m in report["largest"]
    ]
    out += [
        "",
        "## Most connected modules",
        "",
        "| module | fan-in | fan-out |",
        "| --- | ---: | ---: |",
    ]
    out += [
        f"| {_cell(names[m['path']])} | {m['fan_in']} | {m['fan_out']} |"
        for m in report["most_connected"]
    ]
    if report["external"]:
        out += [
            "",
            "## External dependencies",
            "",
            "| package | modules using it |",
            "| --- | ---: |",
        ]
        out += [f"| {_cell(k)} | {v} |" for k, v in list(report["external"].items())[:20]]
    out += _overview(s)
    out += ["", "## Modules", ""]
    for m in report["modules"]:
        out.append(f"### {_code(m['name'])}")
        out.append("")
        out.append(
            f"{_code(m['path'])} · {m['language']} · {m['lines']} lines · fan-in {m['fan_in']} · fan-out {m['fan_out']}"
        )
        out.append("")
        summary = m["summary"]
        if summary["status"] == "summarized":
            out.append(
                f"_Summary by {_code(summary.get('model') or s['model'])} (model-written):_ "
                + summary["text"]
                + (" _(summary of the first chunks only)_" if summary["truncated"] else "")
            )
        else:
            out.append(f"_Summary {summary['status']}: {summary['reason']}._")
        defined = [d["name"] for d in m["definitions"] if d["kind"] != "method"]
        if defined:
            shown = ", ".join(_code(d) for d in defined[:20]) + (
                f" and {len(defined) - 20} more" if len(defined) > 20 else ""
            )
            out += ["", f"Defines: {shown}."]
        if m["imports"]:
            out += ["", "Uses: " + ", ".join(_code(names[p]) for p in m["imports"]) + "."]
        if m["imported_by"]:
            out += ["", "Used by: " + ", ".join(_code(names[p]) for p in m["imported_by"]) + "."]
        if m["errors"]:
            out += ["", "Parse problems: " + "; ".join(m["errors"]) + "."]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
