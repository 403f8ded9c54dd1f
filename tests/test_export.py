"""`tensorforge export`: md, txt, jsonl and csv with correct CSV quoting and Unicode intact;
JSONL inputs stream (parsed line by line as they arrive, even from a pipe)."""

from __future__ import annotations

import csv
import io
import json
import os
import threading

import pytest

from reconciler.cli import main
from reconciler.pipeline.export import CSV_FIELDS, export, iter_results

TRICKY = 'He said "hi", then left;\nsecond line\r\nthird, with comma'
RESULTS = [
    {
        "prompt": 'Explain, briefly: "quantum" computing 🚀',
        "answer": TRICKY,
        "model": "smollm2",
        "backend": "smollm2-cpu",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 12, "completion_tokens": 34},
        "timings": {"total_s": 1.5, "time_to_first_token_s": 0.14, "tokens_per_s": 48.2},
        "error": None,
    },
    {
        "prompt": "日本語 · العربية · naïve café",
        "answer": "",
        "model": "smollm2",
        "backend": None,
        "finish_reason": None,
        "usage": {},
        "timings": {"total_s": 0.01, "time_to_first_token_s": None, "tokens_per_s": None},
        "error": "backend down, retry later",
    },
]


def exported(fmt: str, results=RESULTS) -> str:
    out = io.StringIO()
    assert export(iter(results), fmt, out) == len(results)
    return out.getvalue()


def test_csv_quoting_round_trips_commas_quotes_newlines_and_unicode():
    text = exported("csv")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(rows[0]) == CSV_FIELDS
    assert rows[0]["answer"] == TRICKY and rows[0]["prompt"] == RESULTS[0]["prompt"]
    assert rows[0]["completion_tokens"] == "34" and rows[0]["tokens_per_s"] == "48.2"
    assert rows[1]["prompt"] == "日本語 · العربية · naïve café"
    assert rows[1]["backend"] == "" and rows[1]["error"] == "backend down, retry later"
    assert '"He said ""hi"", then left;' in text  # quotes doubled inside a quoted field


def test_jsonl_keeps_every_field_and_unicode_unescaped():
    lines = exported("jsonl").splitlines()
    assert [json.loads(line) for line in lines] == RESULTS
    assert "🚀" in lines[0] and "\\u" not in lines[0]


def test_markdown_and_text_are_readable():
    md = exported("md")
    assert md.startswith("# TensorForge results\n")
    assert '## 1. Explain, briefly: "quantum" computing 🚀' in md
    assert '> He said "hi", then left;\n> second line' in md
    assert "> error: backend down, retry later" in md
    txt = exported("txt")
    assert "[2] 日本語 · العربية · naïve café" in txt and "[error] backend down" in txt


def test_inputs_run_document_json_list_and_jsonl(tmp_path):
    document = tmp_path / "r.json"
    document.write_text(
        json.dumps({"created": 1, "results": RESULTS}, indent=2, ensure_ascii=False),
        encoding="utf-8",
    )
    listing = tmp_path / "l.json"
    listing.write_text(json.dumps(RESULTS), encoding="utf-8")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(
        "\n" + "\n\n".join(json.dumps(r, ensure_ascii=False) for r in RESULTS) + "\n",
        encoding="utf-8",
    )
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps({"results": RESULTS}), encoding="utf-8")
    for path in (document, listing, jsonl, compact):
        assert list(iter_results(path)) == RESULTS, path.name
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert list(iter_results(empty)) == []


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RESULTS[0]) + "\n{not json\n")
    results = iter_results(path)
    assert next(results) == RESULTS[0]  # the good line came out before the bad one was read
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        next(results)


def test_jsonl_streams_from_a_pipe(tmp_path):
    """The second line is written only after the first result came out: reading the whole
    input first would wait for it forever (here: until the writer gives up)."""
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    first_seen = threading.Event()
    waited: list[bool] = []

    def writer() -> None:
        with open(fifo, "w", encoding="utf-8") as pipe:
            pipe.write(json.dumps(RESULTS[0], ensure_ascii=False) + "\n")
            pipe.flush()
            waited.append(first_seen.wait(10))
            pipe.write(json.dumps(RESULTS[1], ensure_ascii=False) + "\n")

    thread = threading.Thread(target=writer)
    thread.start()
    out = io.StringIO()
    results = iter_results(fifo)
    assert next(results) == RESULTS[0]
    first_seen.set()
    assert export(results, "jsonl", out) == 1
    thread.join()
    assert waited == [True] and json.loads(out.getvalue()) == RESULTS[1]


def test_cli_export_writes_utf8_files(tmp_path, capsys):
    source = tmp_path / "r.jsonl"
    source.write_text(
        "\n".join(json.dumps(r) for r in RESULTS) + "\n", encoding="utf-8"
    )  # ASCII-escaped in
    for fmt in ("md", "txt", "jsonl", "csv"):
        target = tmp_path / f"out.{fmt}"
        assert (
            main(["export", "--input", str(source), "--format", fmt, "--output", str(target)]) == 0
        )
        assert "日本語" in target.read_text(encoding="utf-8")  # unescaped out
    assert b"\r\r\n" not in (tmp_path / "out.csv").read_bytes()  # no newline translation
    assert "exported 2 result(s)" in capsys.readouterr().err


def test_exporting_a_file_onto_itself_keeps_every_result(tmp_path, capsys):
    """The output is written to a temporary file and renamed at the end, so the input is
    read whole before it is replaced (opening the output first used to empty it)."""
    path = tmp_path / "r.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RESULTS), encoding="utf-8"
    )
    assert main(["export", "-i", str(path), "-f", "jsonl", "-o", str(path)]) == 0
    assert list(iter_results(path)) == RESULTS
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # no temporary file left


def test_a_failed_export_leaves_the_old_output(tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.csv"
    source.write_text(json.dumps(RESULTS[0]) + "\n42\n")
    out.write_text("previous export\n")
    assert main(["export", "-i", str(source), "-f", "csv", "-o", str(out)]) == 1
    assert f"{source}:2: expected a result object, found 42" in capsys.readouterr().err
    assert out.read_text() == "previous export\n" and len(list(tmp_path.iterdir())) == 2


def test_byte_order_mark_and_non_utf8_input(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(RESULTS[0]).encode() + b"\r\n")
    assert list(iter_results(bom)) == [RESULTS[0]]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{latin}: not UTF-8 text .*save it as UTF-8"):
        list(iter_results(latin))


CHAT_COMPLETION = {  # what llama-server (and the earlier run.sh) wrote: a raw chat completion
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "smollm2",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}  # fmt: skip


def test_a_raw_chat_completion_is_read_as_a_result_and_old_format_names_work(tmp_path, capsys):
    source = tmp_path / "llama.json"
    source.write_text(json.dumps(CHAT_COMPLETION, indent=2))
    for fmt, expect in (("text", "Paris."), ("markdown", "> Paris."), ("csv", "Paris.,smollm2")):
        target = tmp_path / f"out.{fmt}"
        assert main(["export", "-i", str(source), "-f", fmt, "-o", str(target)]) == 0
        assert expect in target.read_text()
    native = tmp_path / "completion.json"  # llama.cpp's native /completion answer
    native.write_text(
        json.dumps({"content": "Lyon.", "model": "m", "tokens_predicted": 2, "stop": True})
    )
    assert list(iter_results(native))[0]["answer"] == "Lyon."


def test_what_export_cannot_read_is_an_error_naming_the_file(tmp_path, capsys):
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": "world"}))
    assert main(["export", "-i", str(odd), "-f", "md", "-o", str(tmp_path / "out.md")]) == 1
    assert (
        f"{odd}:1: not a run result" in capsys.readouterr().err
        and not (tmp_path / "out.md").exists()
    )
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": []}))
    assert main(["export", "-i", str(empty), "-f", "txt"]) == 1
    assert f"{empty}: no results in it" in capsys.readouterr().err
