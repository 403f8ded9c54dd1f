"""`tensorforge analyze`, the deterministic half: fixture trees in Python, Rust, Nix and
TypeScript with known structure (modules, edges, cycles, entry points asserted exactly), the
walker's .gitignore handling, the Mermaid output, prompt budgeting, and this repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.analyze.budget import Budget, chunk_text, pack
from reconciler.analyze.graph import strongly_connected_components
from reconciler.analyze.mermaid import mermaid
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import clean

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "analyze"


def structure(name: str):
    return analyze_structure(FIXTURES / name).graph


def edges(graph) -> set[tuple[str, str]]:
    return set(graph.edges)


def test_python_fixture():
    g = structure("python")
    assert g.names == {
        "app/__init__.py": "app",
        "app/__main__.py": "app.__main__",
        "app/cli.py": "app.cli",
        "app/core.py": "app.core",
        "app/models.py": "app.models",
        "app/util/__init__.py": "app.util",
        "app/util/helpers.py": "app.util.helpers",
        "tests/check_core.py": "check_core",
    }  # generated/ and *.tmp.py are in the fixture's .gitignore
    assert edges(g) == {
        ("app/__main__.py", "app/cli.py"),
        ("app/cli.py", "app/core.py"),  # from . import core
        ("app/cli.py", "app/util/helpers.py"),  # from .util import helpers (a submodule)
        ("app/core.py", "app/models.py"),
        ("app/core.py", "app/util/helpers.py"),
        ("app/models.py", "app/core.py"),  # lazy import inside a method
        ("tests/check_core.py", "app/core.py"),
    }
    assert g.cycles() == [["app/core.py", "app/models.py"]]
    assert g.cycle_path(g.cycles()[0]) == ["app/core.py", "app/models.py", "app/core.py"]
    assert g.external == {"app/cli.py": ["requests"]}  # json and os are the standard library
    assert g.entry_points == {
        "app/__main__.py": ["__main__.py", "nothing in the tree imports it"],
        "app/cli.py": ["if __name__ == '__main__'", "script 'pyapp' in pyproject.toml"],
        "tests/check_core.py": ["nothing in the tree imports it"],
    }
    assert (g.fan_in("app/core.py"), g.fan_out("app/core.py")) == (3, 2)
    defined = [(d.kind, d.name) for d in g.modules["app/core.py"].definitions]
    assert defined == [("function", "run"), ("class", "Engine"), ("method", "Engine.start")]


def test_rust_fixture():
    g = structure("rust")
    assert g.names == {
        "src/bin/tool.rs": "tool(bin)",
        "src/cli.rs": "rust_app(bin)::cli",
        "src/config.rs": "rust_app(bin)::config",
        "src/engine/mod.rs": "rust_app::engine",
        "src/engine/parser.rs": "rust_app::engine::parser",
        "src/lib.rs": "rust_app",
        "src/main.rs": "rust_app(bin)",
        "src/util.rs": "rust_app::util",
    }
    assert edges(g) == {
        ("src/bin/tool.rs", "src/util.rs"),  # use rust_app::util (the library crate)
        ("src/cli.rs", "src/config.rs"),  # use crate::config::Config
        ("src/cli.rs", "src/engine/mod.rs"),  # use rust_app::engine::Engine
        ("src/engine/mod.rs", "src/engine/parser.rs"),  # mod parser; use crate::engine::parser
        ("src/engine/mod.rs", "src/util.rs"),  # use super::util::clamp
        ("src/engine/parser.rs", "src/engine/mod.rs"),  # use crate::engine::Engine
        ("src/lib.rs", "src/engine/mod.rs"),
        ("src/lib.rs", "src/util.rs"),
        ("src/main.rs", "src/cli.rs"),
        ("src/main.rs", "src/config.rs"),
    }
    assert sorted({r.kind for r in g.edges[("src/engine/mod.rs", "src/engine/parser.rs")]}) == [
        "mod",
        "use",
    ]
    assert g.cycles() == [["src/engine/mod.rs", "src/engine/parser.rs"]]
    assert g.external == {"src/engine/parser.rs": ["serde"]}  # std is not listed
    assert g.entry_points == {
        "src/bin/tool.rs": ["fn main", "crate root tool(bin)", "nothing in the tree imports it"],
        "src/lib.rs": ["nothing in the tree imports it"],
        "src/main.rs": ["fn main", "crate root rust_app(bin)", "nothing in the tree imports it"],
    }
    kinds = {(d.kind, d.name) for d in g.modules["src/engine/mod.rs"].definitions}
    assert kinds == {("mod", "parser"), ("struct", "Engine"), ("impl", "Engine")}


def test_nix_fixture():
    g = structure("nix")
    assert list(g.modules) == [
        "flake.nix", "hosts/host.nix", "modules/common.nix", "modules/options.nix",
        "modules/service.nix", "pkgs/tool/default.nix",
    ]  # fmt: skip
    assert edges(g) == {
        ("flake.nix", "hosts/host.nix"),  # modules = [ ./hosts/host.nix ]
        ("flake.nix", "modules/service.nix"),  # nixosModules.default = ./modules/service.nix
        ("flake.nix", "pkgs/tool/default.nix"),  # callPackage ./pkgs/tool { }
        ("hosts/host.nix", "modules/service.nix"),  # imports = [ ../modules/service.nix ]
        ("modules/service.nix", "modules/common.nix"),  # import ./common.nix { … }
        ("modules/service.nix", "modules/options.nix"),
    }  # `src = ./.;` in pkgs/tool and the interpolated ./${name}.conf are not dependencies
    assert {k: sorted({r.kind for r in v}) for k, v in g.edges.items()}[
        ("flake.nix", "pkgs/tool/default.nix")
    ] == ["callPackage"]
    assert g.cycles() == []
    assert g.entry_points == {"flake.nix": ["flake.nix", "nothing in the tree imports it"]}
    names = [d.name for d in g.modules["modules/service.nix"].definitions]
    assert names == ["common", "imports", "config"]


def test_typescript_fixture():
    g = structure("typescript")
    assert list(g.modules) == [
        "src/app.ts",
        "src/cli.ts",
        "src/index.ts",
        "src/plugins/loader.tsx",
        "src/store/index.ts",
        "src/types.ts",
    ]  # fmt: skip  (node_modules/ is ignored)
    assert edges(g) == {
        ("src/app.ts", "src/store/index.ts"),  # "./store/index.js" names the .ts file
        ("src/app.ts", "src/types.ts"),  # import type
        ("src/cli.ts", "src/app.ts"),  # require("./app")
        ("src/cli.ts", "src/plugins/loader.tsx"),  # await import("./plugins/loader")
        ("src/index.ts", "src/app.ts"),  # export { App } from "./app"
        ("src/index.ts", "src/types.ts"),  # export * from "./types"
        ("src/store/index.ts", "src/app.ts"),
    }
    assert g.cycles() == [["src/app.ts", "src/store/index.ts"]]
    assert g.external == {"src/app.ts": ["@scope/pkg", "lodash"]}  # node:fs is the runtime
    assert g.entry_points == {
        "src/cli.ts": ["package.json of .", "nothing in the tree imports it"],
        "src/index.ts": ["index.ts", "nothing in the tree imports it"],
    }
    kinds = [(d.kind, d.name) for d in g.modules["src/types.ts"].definitions]
    assert kinds == [("interface", "Config"), ("type", "Id"), ("enum", "Mode")]


def test_walk_honours_nested_gitignore_and_skips_binaries(tmp_path: Path):
    (tmp_path / ".gitignore").write_text("*.log\nbuild/\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / ".gitignore").write_text("secret.py\n!keep.log\n")
    for name in ("a.py", "x.log", "pkg/b.py", "pkg/secret.py", "pkg/keep.log", "build/c.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("import os\n")
    (tmp_path / "blob.py").write_bytes(b"\x00\x01binary")
    found = [f.path for f in analyze_structure(tmp_path).files]
    assert found == [".gitignore", "a.py", "pkg/.gitignore", "pkg/b.py", "pkg/keep.log"]


def test_tarjan_finds_every_component():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": ["d"], "f": ["f"], "g": []}
    components = strongly_connected_components(list(graph), lambda n: graph[n])
    assert sorted(sorted(c) for c in components) == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]
    chain = {str(i): [str(i + 1)] for i in range(5000)} | {"5000": ["0"]}  # no recursion limit
    assert len(strongly_connected_components(list(chain), lambda n: chain[n])) == 1


MERMAID_LINE = re.compile(
    r"^(flowchart LR"
    r"|  subgraph m_\w+\[\"[^\"]*\"\]"
    r"|  end"
    r"|\s+m_\w+\[\"[^\"]*\"\]"
    r"|  m_\w+ --> m_\w+"
    r"|  classDef \w+ [\w:#,]+"
    r"|  class m_\w+(,m_\w+)* \w+)$"
)


@pytest.mark.parametrize("name", ["python", "rust", "nix", "typescript"])
def test_mermaid_is_valid_and_complete(name: str):
    g = structure(name)
    diagram, left_out = mermaid(g)
    lines = diagram.splitlines()
    bad = [line for line in lines if not MERMAID_LINE.match(line)]
    assert not bad, bad
    assert sum(1 for line in lines if "-->" in line) == len(g.edges)
    assert lines.count("  end") == sum(1 for line in lines if "subgraph" in line)
    ids = re.findall(r"\b(m_\w+)\[", diagram)
    assert len(ids) == len(set(ids))
    assert left_out == len(g.modules) - len({p for e in g.edges for p in e})


def test_budget_chunks_fit_and_pack_converges():
    budget = Budget(2048, 128, 3.0)
    assert budget.prompt_chars == (2048 - 128 - 64) * 3
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000)) + "y" * 9000
    chunks = chunk_text(text, 1000)
    assert "".join(chunks) == text and all(len(c) <= 1000 for c in chunks)
    groups = pack(["z" * 900] * 7, 1000)
    assert all(len(g) >= 2 for g in groups[:-1]) and sum(len(g) for g in groups) == 7
    with pytest.raises(ValueError, match="--max-tokens"):
        Budget(256, 200)


def test_clean_cuts_model_loops():
    looped = "It starts the engine, which is then used to start the engine, which is then used to start the engine."
    assert looped.startswith(clean(looped)) and clean(looped).count("which is then used") == 1
    assert clean("A b. A b. C d.") == "A b. C d."


def test_this_repository():
    g = analyze_structure(REPO).graph
    cli = "reconciler/cli/__init__.py"
    assert g.names[cli] == "reconciler.cli"
    assert "reconciler/cli/host.py" in g.successors(cli)
    assert "reconciler/config/loader.py" in g.successors("reconciler/cli/common.py")
    assert "reconciler/analyze/command.py" in g.successors("reconciler/cli/pipeline.py")
    assert "reconciler/config/schema.py" in g.successors("reconciler/config/loader.py")
    assert "script 'tensorforge' in pyproject.toml" in g.entry_points[cli]
    assert not any(p.startswith((".venv/", ".cache/")) for p in g.modules)  # .gitignore'd
    assert any(p.endswith(".nix") for p in g.modules)


def test_cli_without_gateway_writes_structure_and_marks_skipped(tmp_path: Path):
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "analyze", str(FIXTURES / "typescript"),
         "--output", str(out), "--json", str(data), "--gateway", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text())
    assert report["summaries"]["status"] == "skipped"
    assert "unreachable" in report["summaries"]["reason"]
    assert {m["summary"]["status"] for m in report["modules"]} == {"skipped"}
    assert [e["from"] + ">" + e["to"] for e in report["edges"]][:1] == [
        "src/app.ts>src/store/index.ts"
    ]
    markdown = out.read_text()
    assert "```mermaid\nflowchart LR" in markdown
    assert "_Skipped: gateway http://127.0.0.1:9 unreachable" in markdown
    assert "summaries skipped" in done.stderr


def test_byte_order_mark_and_a_non_utf8_file_name(tmp_path: Path):
    """A BOM-prefixed Python file (Python imports it fine) keeps its structure, and a file
    name that is not UTF-8 (PEP 383 surrogates) is written escaped, not a failed report."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bom.py").write_bytes(b"\xef\xbb\xbfimport os\n\n\nclass A:\n    pass\n")
    (src / "b.py").write_text("import bom\n")
    (src / os.fsdecode(b"caf\xe9.py")).write_text("import b\n")
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "analyze", str(src), "--no-summaries",
         "--output", str(out), "--json", str(data)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text(encoding="utf-8"))
    modules = {m["path"]: m for m in report["modules"]}
    assert [d["name"] for d in modules["bom.py"]["definitions"]] == ["A"]
    assert not modules["bom.py"].get("errors")
    assert "caf\\udce9.py" in data.read_text(encoding="utf-8") and "caf\\udce9.py" in out.read_text()
    assert {(e["from"], e["to"]) for e in report["edges"]} >= {("b.py", "bom.py")}
