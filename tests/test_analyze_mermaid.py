"""Issue 20, fix 6: diagrams that render. A large tree is drawn one node per directory, tests
are left out unless asked for, the text stays under Mermaid's maxTextSize, and every diagram
we produce is parsed by Mermaid's own parser (npm `mermaid` under node, installed outside the
repository in /var/cache/tensorforge-npm through npm's ordinary client; the test is skipped
with the reason when node or that install is unavailable, and the line-by-line grammar check
in test_analyze_structure.py still runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.analyze.mermaid import MAX_CHARS, mermaid
from reconciler.analyze.structure import analyze_structure

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "analyze"
NPM_CACHE = Path(os.environ.get("TF_NPM_CACHE", "/var/cache/tensorforge-npm"))
PACKAGES = ("mermaid@11", "jsdom@26")


def large_tree(root: Path, directories: int = 30, per_directory: int = 10) -> Path:
    """300 modules in 30 packages, each importing five others (1,500 edges), and a tests/
    package importing all of them: a hairball drawn module by module."""
    total = directories * per_directory
    for d in range(directories):
        package = root / "big" / f"part{d:02d}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for m in range(per_directory):
            n = d * per_directory + m
            others = [(n * 7 + k * 13 + 1) % total for k in range(5)]
            imports = "".join(
                f"from big.part{o // per_directory:02d} import mod{o % per_directory}\n"
                for o in others
            )
            (package / f"mod{m}.py").write_text(imports + f"VALUE = {n}\n")
    (root / "big" / "__init__.py").write_text("")
    (root / "tests").mkdir()
    body = "".join(f"import big.part{d:02d}.mod0\n" for d in range(directories))
    (root / "tests" / "test_all.py").write_text(body)
    return root


def test_a_large_tree_is_drawn_by_directory_within_the_size_limit(tmp_path: Path):
    g = analyze_structure(large_tree(tmp_path)).graph
    assert len(g.modules) == 332 and len(g.edges) > 1400
    drawn = mermaid(g)
    assert drawn.level == "directories"
    assert len(drawn.text) <= MAX_CHARS < 50_000
    nodes = [line for line in drawn.text.splitlines() if line.startswith("  d_")]
    boxes = [line for line in nodes if "[" in line and "->" not in line]
    assert len(boxes) == 30  # one per package directory; tests/ is not drawn
    assert all("(10 modules)" in line for line in boxes)
    assert drawn.tests_left_out == 1 and "tests" not in drawn.text
    # Every module dependency between two directories is counted on their arrow.
    counted = sum(int(line.split('|"')[1].split('"|')[0]) for line in nodes if "|" in line)
    between = sum(1 for s, t in g.edges if s.split("/")[1] != t.split("/")[1] and "tests" not in s)
    assert counted == between
    with_tests = mermaid(g, include_tests=True)
    assert with_tests.tests_left_out == 0 and "tests/ (1 module)" in with_tests.text


def test_too_many_arrows_between_directories_falls_back_to_a_cut_module_diagram(
    tmp_path: Path,
):
    g = analyze_structure(large_tree(tmp_path)).graph
    # 30 package directories have more arrows than 20, and one directory ("big/") says nothing
    drawn = mermaid(g, max_edges=20)
    arrows = sum(1 for line in drawn.text.splitlines() if "->" in line)
    assert drawn.level == "modules" and arrows == 20
    assert drawn.edges_left_out == sum(1 for s, _ in g.edges if not s.startswith("tests/")) - 20


def test_the_module_diagram_is_cut_to_the_size_limit(tmp_path: Path):
    """Were a module-level diagram too long (tiny limit here), edges are dropped until it fits."""
    g = analyze_structure(FIXTURES / "python").graph
    drawn = mermaid(g, max_chars=400)
    assert len(drawn.text) <= 400 and drawn.edges_left_out > 0


def _mermaid_installed() -> Path | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    if not (NPM_CACHE / "node_modules" / "mermaid").is_dir():
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_CACHE), *PACKAGES],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            return None
    return NPM_CACHE


def test_every_diagram_parses_with_mermaids_own_parser(tmp_path: Path):
    cache = _mermaid_installed()
    if cache is None:
        pytest.skip(f"npm could not install {', '.join(PACKAGES)} into {NPM_CACHE}")
    diagrams = {
        name: mermaid(analyze_structure(FIXTURES / name).graph, include_tests=True).text
        for name in ("python", "rust", "nix", "typescript", "typescript-types", "rust-cargo")
    }
    large = analyze_structure(large_tree(tmp_path)).graph
    diagrams["large, by directory"] = mermaid(large).text
    diagrams["this repository"] = mermaid(analyze_structure(REPO).graph).text
    script = cache / "mermaid_parse.mjs"
    shutil.copyfile(REPO / "tests" / "fakes" / "mermaid_parse.mjs", script)
    done = subprocess.run(
        ["node", str(script)], input=json.dumps(list(diagrams.values())),
        capture_output=True, text=True, timeout=300, cwd=cache,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert parsed["maxTextSize"] == 50_000
    failures = {
        name: result["error"]
        for name, result in zip(diagrams, parsed["results"], strict=True)
        if not result["ok"]
    }
    assert failures == {}
    assert all(len(text) <= parsed["maxTextSize"] for text in diagrams.values())
    assert any("-.->" in text for text in diagrams.values())  # dashed arrows parse too
    assert "-->|" in diagrams["large, by directory"]  # labelled arrows parse too
