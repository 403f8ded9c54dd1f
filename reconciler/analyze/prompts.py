"""The words sent to the model. Kept apart so they can be read and tuned in one place."""

from __future__ import annotations

from reconciler.analyze.budget import truncate

SYSTEM = (
    "You are a senior software engineer documenting a code base. "
    "Answer in plain prose. Be specific and brief; do not repeat yourself or the code."
)


def module_header(name: str, path: str, language: str, lines: int, defines: list[str],
                  imports: list[str], imported_by: list[str], limit: int) -> str:  # fmt: skip
    parts = [f"Module `{name}` (file {path}, {language}, {lines} lines)."]
    if defines:
        parts.append("Defines: " + ", ".join(defines) + ".")
    if imports:
        parts.append("Uses modules: " + ", ".join(imports) + ".")
    if imported_by:
        parts.append("Used by: " + ", ".join(imported_by) + ".")
    return truncate("\n".join(parts), limit)


def module_prompt(header: str, source: str, part: int, parts: int) -> str:
    which = f" (part {part} of {parts})" if parts > 1 else ""
    ask = (
        "Summarize what this part of the module does in two sentences."
        if parts > 1
        else "Summarize in two or three sentences what this module is for and how it works."
    )
    return f"{header}\n\nSource{which}:\n```\n{source}\n```\n\n{ask}"


def module_reduce_prompt(header: str, partials: list[str]) -> str:
    joined = "\n".join(f"- {p}" for p in partials)
    return (
        f"{header}\n\nSummaries of consecutive parts of this module:\n{joined}\n\n"
        "Combine them into one summary of two or three sentences: what the module is for and how it works."
    )


def overview_prompt(facts: str, summaries: list[str], final: bool) -> str:
    joined = "\n".join(f"- {s}" for s in summaries)
    ask = (
        "Describe the architecture of this code base in one or two paragraphs: its main parts, "
        "how they depend on each other, and where execution starts."
        if final
        else "Summarize what this group of modules does together in three sentences."
    )
    return f"{facts}\n\nModule summaries:\n{joined}\n\n{ask}"
