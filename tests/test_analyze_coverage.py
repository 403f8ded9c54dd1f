"""Issue 20, fix 4 (nothing dropped silently) and issue 14, item 10 (an unreadable directory
reported as "cannot write"): every file the walk leaves out, every import that names
something of the tree and finds nothing, and every programming language without a parser is
in the report with the reason.

Unreadable files are real: the tree is copied and chmod-ed. Root reads everything, so as root
the command runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from the bounding
set before exec), which makes permission bits apply to it as to any user."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "analyze" / "leftout"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_read_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "analyze", *args, "--no-summaries", "-q"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        preexec_fn=_drop_read_override if os.geteuid() == 0 else None,
    )  # fmt: skip


def leftout_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(FIXTURE, root)
    (root / "pkg" / "big.py").write_text("X = 1\n" * 200_000)  # 1.2 MB
    (root / "pkg" / "blob.py").write_bytes(b"X = 1\n\0\0\0")
    (root / "pkg" / "secret.py").chmod(0)
    (root / "pkg" / "private").chmod(0)
    return root


def test_every_file_left_out_and_every_unresolved_import_is_reported(tmp_path: Path):
    root = leftout_tree(tmp_path)
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    done = analyze(str(root), "--output", str(out), "--json", str(data))
    assert done.returncode == 0, done.stderr
    assert "cannot write" not in done.stderr
    assert "not covered: 4 file(s) left out, 6 unresolved import(s), go not parsed (2 files)" in (
        done.stderr
    )
    report = json.loads(data.read_text())
    assert {f["path"]: f["reason"] for f in report["left_out"]} == {
        "pkg/big.py": "over 1,000,000 bytes (1,200,000)",
        "pkg/blob.py": "binary (contains NUL bytes)",
        "pkg/private/": "unreadable (Permission denied)",
        "pkg/secret.py": "unreadable (Permission denied)",
    }
    unresolved = {(u["from"], u["import"], u["reason"]) for u in report["unresolved"]}
    assert unresolved == {
        ("pkg/main.py", "pkg", "pkg/big.py is left out: over 1,000,000 bytes (1,200,000)"),
        ("pkg/main.py", "pkg", "pkg/blob.py is left out: binary (contains NUL bytes)"),
        ("pkg/main.py", "pkg", "pkg/secret.py is left out: unreadable (Permission denied)"),
        ("pkg/main.py", "pkg.private", "no module pkg.private in the tree (package pkg has none)"),
        ("pkg/main.py", "missing", "no module pkg.missing in the tree (package pkg has none)"),
        ("web/app.ts", "./gone", "no such file in the tree (extensions and index files tried)"),
    }
    # Not rewritten to the package's __init__.py: the only edges are the real ones.
    edges = {(e["from"], e["to"]) for e in report["edges"]}
    assert edges == {("pkg/main.py", "pkg/helpers.py"), ("web/app.ts", "web/helper.ts")}
    assert report["not_parsed"] == {"go": 2}
    markdown = out.read_text()
    covered = markdown.split("## Not covered")[1].split("\n## ")[0]
    assert "**Not parsed** (no parser for these languages" in covered and "go (2 files)" in covered
    assert "- `pkg/private/`: unreadable (Permission denied)" in covered
    assert "Imports of modules inside the directories left out above appear here too." in covered
    assert "- `pkg/main.py` line 9: `missing`: no module pkg.missing" in covered


def test_an_unreadable_root_says_it_cannot_be_read(tmp_path: Path):
    root = tmp_path / "closed"
    root.mkdir()
    (root / "a.py").write_text("X = 1\n")
    root.chmod(0)
    done = analyze(str(root), "--output", str(tmp_path / "r.md"))
    assert done.returncode == 1
    assert "cannot read the directory (Permission denied)" in done.stderr
    assert "cannot write" not in done.stderr
    assert not (tmp_path / "r.md").exists()


def test_a_complete_tree_says_so():
    from reconciler.analyze.report import render_markdown
    from reconciler.analyze.run import analyze as analyze_tree

    report = analyze_tree(REPO / "tests" / "fixtures" / "analyze" / "rust-cargo", None, False)
    assert (report["left_out"], report["unresolved"], report["not_parsed"]) == ([], [], {})
    assert "Every file was read and every import within the tree resolved." in render_markdown(
        report
    )
