"""`tensorforge export`: results to Markdown, plain text, JSONL or CSV.

Reads JSONL line by line and writes as it reads, so large result files stream through."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

FORMATS = ("md", "txt", "jsonl", "csv")
FORMAT_NAMES = {
    "markdown": "md",
    "text": "txt",
}  # also accepted, as the earlier export script named them
RESULT_FIELDS = ("prompt", "answer", "error")
CSV_FIELDS = ["prompt", "answer", "model", "backend", "finish_reason", "prompt_tokens",
              "completion_tokens", "total_s", "time_to_first_token_s", "tokens_per_s", "error"]  # fmt: skip


def iter_results(path: Path) -> Iterator[dict]:
    """A `run` result file ({"results": [...]}), a JSON list, or JSONL. JSONL is parsed line
    by line as it is read (never seeking, so a pipe works); a JSONL line holding a whole
    compact result document contributes its results."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the JSON.
        with path.open(encoding="utf-8-sig") as handle:
            yield from _parse(path, handle)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None


def _parse(path: Path, handle: TextIO) -> Iterator[dict]:
    lines = enumerate(handle, start=1)
    number, first = next(((n, line) for n, line in lines if line.strip()), (0, None))
    if first is None:
        return
    try:
        item = json.loads(first)
    except json.JSONDecodeError:
        item = None
    if item is None or first.lstrip().startswith("["):
        # A pretty-printed document or a JSON list: it has to be read whole.
        try:
            data = json.loads(first + handle.read())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither JSON nor JSONL: {exc}") from None
        yield from _results(data, str(path))
        return
    yield from _results(item, f"{path}:{number}")
    for number, line in lines:
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
            yield from _results(data, f"{path}:{number}")


def _results(data, where: str) -> list[dict]:
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and isinstance(data.get("results"), list):
        items = data["results"]
    else:
        items = [data]
    return [_result(item, where) for item in items]


def _result(item, where: str) -> dict:
    """A `run` result as it is; a raw chat or text completion (what llama-server and the
    earlier run.sh wrote) or llama.cpp's native /completion answer turned into one; anything
    else is an error, never an empty answer."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a result object, found {json.dumps(item)[:40]}")
    if any(k in item for k in RESULT_FIELDS):
        return item
    choices = item.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        answer = message.get("content") or choice.get("text") or ""
        return {"prompt": None, "answer": answer, "model": item.get("model"), "backend": None,
                "finish_reason": choice.get("finish_reason"), "usage": item.get("usage") or {}, "error": None}  # fmt: skip
    if isinstance(item.get("content"), str) and ("tokens_predicted" in item or "stop" in item):
        usage = {
            "prompt_tokens": item.get("tokens_evaluated"),
            "completion_tokens": item.get("tokens_predicted"),
        }
        return {"prompt": item.get("prompt"), "answer": item["content"], "model": item.get("model"),
                "backend": None, "finish_reason": item.get("stop_type"), "usage": usage, "error": None}  # fmt: skip
    keys = ", ".join(sorted(item)[:6]) or "none"
    raise ValueError(
        f"{where}: not a run result (prompt, answer) nor a chat completion (choices); its keys: {keys}"
    )


def _flat(result: dict) -> dict:
    usage = result.get("usage") or {}
    timings = result.get("timings") or {}
    return {
        **{
            k: result.get(k)
            for k in ("prompt", "answer", "model", "backend", "finish_reason", "error")
        },
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        **{k: timings.get(k) for k in ("total_s", "time_to_first_token_s", "tokens_per_s")},
    }


def export(results: Iterator[dict], fmt: str, out: TextIO) -> int:
    fmt = FORMAT_NAMES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    count = 0
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n") if fmt == "csv" else None
    if writer:
        writer.writeheader()
    if fmt == "md":
        out.write("# TensorForge results\n")
    for result in results:
        count += 1
        row = _flat(result)
        if writer:
            writer.writerow(row)
        elif fmt == "jsonl":
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
        elif fmt == "md":
            out.write(_markdown(count, row))
        else:
            out.write(_text(count, row))
    return count


def _markdown(number: int, row: dict) -> str:
    buf = io.StringIO()
    buf.write(f"\n## {number}. {_one_line(row['prompt'])}\n\n")
    buf.write(f"- model: `{row['model']}` (backend `{row['backend']}`)\n")
    buf.write(f"- tokens: {row['prompt_tokens']} in, {row['completion_tokens']} out; ")
    buf.write(f"{row['total_s']} s total, first token {row['time_to_first_token_s']} s\n\n")
    if row["error"]:
        buf.write(f"> error: {row['error']}\n")
    else:
        buf.write("\n".join(f"> {line}" for line in (row["answer"] or "").splitlines()) + "\n")
    return buf.getvalue()


def _text(number: int, row: dict) -> str:
    answer = row["error"] and f"[error] {row['error']}" or row["answer"] or ""
    return f"[{number}] {row['prompt']}\n({row['model']}, {row['total_s']} s)\n{answer}\n\n"


def _one_line(text: str | None, limit: int = 80) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
