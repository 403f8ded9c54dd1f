"""`tensorforge analyze`, the deterministic half: fixture trees in Python, Rust, Nix and
TypeScript with known structure (modules, edges, cycles, entry points asserted exactly), the
walker's .gitignore handling, the Mermaid output, prompt budgeting, and this repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.analyze.budget import MIN_ROOM_CHARS, Budget, chunk_text, pack, truncate
from reconciler.analyze.client import clean
from reconciler.analyze.graph import strongly_connected_components
from reconciler.analyze.mermaid import mermaid
from reconciler.analyze.structure import analyze_structure

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
        "src/bin/tool.rs": "rust_app/tool(bin)",  # binaries carry their package's name
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
        "src/bin/tool.rs": [
            "fn main",
            "crate root rust_app/tool(bin)",
            "nothing in the tree imports it",
        ],
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
        ("src/store/index.ts", "src/app.ts"),  # import type
    }
    assert {e for e in g.edges if g.type_only(e)} == {
        ("src/app.ts", "src/types.ts"),
        ("src/store/index.ts", "src/app.ts"),
    }
    assert g.cycles() == []  # the loop runs through `import type`: tsc erases it
    assert g.type_only_cycles() == [["src/app.ts", "src/store/index.ts"]]
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
    r"|  m_\w+ (-->|-\.->) m_\w+"
    r"|  classDef \w+ [\w:#,]+"
    r"|  class m_\w+(,m_\w+)* \w+)$"
)


@pytest.mark.parametrize("name", ["python", "rust", "nix", "typescript"])
def test_mermaid_is_valid_and_complete(name: str):
    g = structure(name)
    drawn = mermaid(g, include_tests=True)
    diagram = drawn.text
    lines = diagram.splitlines()
    bad = [line for line in lines if not MERMAID_LINE.match(line)]
    assert not bad, bad
    assert sum(1 for line in lines if "->" in line) == len(g.edges)
    dashed = sum(1 for line in lines if "-.->" in line)
    assert dashed == sum(1 for e in g.edges if g.type_only(e))
    assert lines.count("  end") == sum(1 for line in lines if "subgraph" in line)
    ids = re.findall(r"\b(m_\w+)\[", diagram)
    assert len(ids) == len(set(ids))
    assert drawn.isolated == len(g.modules) - len({p for e in g.edges for p in e})
    assert (drawn.edges_left_out, drawn.modules_left_out) == (0, 0)


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
    assert clean(looped) == ""  # cut at the repeat, no sentence is left whole
    looped = "It runs jobs. " + looped
    assert clean(looped) == "It runs jobs."
    # An answer cut by max_tokens ends mid-sentence: only whole sentences are kept.
    assert clean("It parses Cargo.toml files. Then it reads the (lib) name and") == (
        "It parses Cargo.toml files."
    )
    assert clean('It says "hello." It also') == 'It says "hello."'
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


def test_cli_without_gateway_fails_and_no_summaries_writes_structure(tmp_path: Path):
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    command = [sys.executable, "-m", "reconciler.cli", "analyze", str(FIXTURES / "typescript"),
               "--output", str(out), "--json", str(data), "--gateway", "http://127.0.0.1:9"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1, done.stderr  # asked for summaries, got none: an error
    assert "gateway http://127.0.0.1:9 unreachable" in done.stderr
    assert "--no-summaries" in done.stderr  # the way out is named
    assert not out.exists() and not data.exists()  # refused before any work
    done = subprocess.run(
        [*command, "--no-summaries"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text())
    assert report["summaries"]["status"] == "skipped"
    assert "--no-summaries" in report["summaries"]["reason"]
    assert {m["summary"]["status"] for m in report["modules"]} == {"skipped"}
    assert [e["from"] + ">" + e["to"] for e in report["edges"]][:1] == [
        "src/app.ts>src/store/index.ts"
    ]
    markdown = out.read_text()
    assert "```mermaid\nflowchart LR" in markdown
    assert "_Skipped: summaries not requested (--no-summaries)._" in markdown


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
    assert (
        "caf\\udce9.py" in data.read_text(encoding="utf-8") and "caf\\udce9.py" in out.read_text()
    )
    assert {(e["from"], e["to"]) for e in report["edges"]} >= {("b.py", "bom.py")}


def test_python_root_that_is_a_package_keeps_its_name(tmp_path: Path):
    """Analysing a package directory itself: its modules are named below the package, so
    `from mypkg import b` is the sibling module, not an external package."""
    root = tmp_path / "mypkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from mypkg import b\nfrom .sub import c\n")
    (root / "b.py").write_text("X = 1\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "c.py").write_text("import mypkg.b\nfrom .. import a\n")
    g = analyze_structure(root).graph
    assert g.names == {
        "__init__.py": "mypkg",
        "a.py": "mypkg.a",
        "b.py": "mypkg.b",
        "sub/__init__.py": "mypkg.sub",
        "sub/c.py": "mypkg.sub.c",
    }
    assert edges(g) == {
        ("a.py", "b.py"),
        ("a.py", "sub/c.py"),
        ("sub/c.py", "b.py"),
        ("sub/c.py", "a.py"),
    }
    assert g.external == {}
    # A package inside packages: the enclosing ones (outside the walk) name it too.
    (tmp_path / "__init__.py").write_text("")
    outer = analyze_structure(root).graph
    assert outer.names["a.py"] == f"{tmp_path.name}.mypkg.a"


def test_python_namespace_packages_and_names_from_a_package():
    g = structure("python-namespace")
    assert edges(g) == {
        ("main.py", "ns/sub/mod.py"),  # import ns.sub.mod; from ns.sub import mod (no __init__)
        ("main.py", "pkg/helpers.py"),  # from pkg import helpers: the submodule
        ("main.py", "pkg/__init__.py"),  # ... and VERSION, a name pkg/__init__.py defines
    }
    assert sorted({r.kind for r in g.edges[("main.py", "ns/sub/mod.py")]}) == ["from", "import"]
    assert g.external == {}
    assert g.entry_points == {"main.py": ["nothing in the tree imports it"]}


def test_walk_allow_list_gitignore(tmp_path: Path):
    """`*`, `!*/`, `!*.py`: git keeps every directory and every .py file (the last matching
    pattern wins), with a nested .gitignore still excluding and re-including below it."""
    (tmp_path / ".gitignore").write_text("*\n!*/\n!*.py\n")
    deep = "/".join(f"d{i}" for i in range(1, 41))
    files = ["top.py", "notes.txt", "a/b/m.py", "a/b/m.txt", f"deep/{deep}/x.py",
             "sub/build/drop.py", "sub/build/keep.py", "sub/docs/gen/g.py", "sub/docs/d.py"]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "sub" / ".gitignore").write_text("build/*\n!build/keep.py\n/docs/gen/\n")
    found = [f.path for f in analyze_structure(tmp_path).files]
    assert found == [
        "a/b/m.py",
        f"deep/{deep}/x.py",
        "sub/build/keep.py",
        "sub/docs/d.py",
        "top.py",
    ]


def test_walk_gitignore_patterns_match_git(tmp_path: Path):
    (tmp_path / ".gitignore").write_text(
        "# comment\n*.log\n!logs/debug.log\nbuild/*\n!build/keep.py\n/docs/\na/**/c\n"
        "**/lib\n*.[oa]\nsp\\ ace/\n\\#*\nR?ADME.md\ntrailing.py   \n"
    )
    names = ["a/b/c/f.py", "a/b/g.txt", "a/x.log", "build/x/y.py", "build/keep.py",
             "docs/gen/z.md", "src/lib/m.ts", "src/main.ts", "src/docs/k.md", "logs/debug.log",
             "logs/other.log", "sp ace/q.py", "foo.o", "bar.c", "#hash", "README.md",
             "trailing.py"]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    found = [f.path for f in analyze_structure(tmp_path).files]
    assert found == [".gitignore", "a/b/g.txt", "bar.c", "build/keep.py", "logs/debug.log",
                     "src/docs/k.md", "src/main.ts"]  # fmt: skip
    if shutil.which("git"):  # and that is what git itself lists for the same tree
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        listed = subprocess.run(["git", "-C", str(tmp_path), "ls-files", "-co", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
        assert found == sorted(filter(None, (n.strip('"').replace("\\#", "#") for n in listed)))


def test_rust_workspace_shared_test_modules_path_attribute_and_package_names():
    g = structure("rust-workspace")
    assert g.names == {
        "alpha/src/cfg.rs": "alpha(bin)::cfg",
        "alpha/src/main.rs": "alpha(bin)",
        "alpha/src/platform/linux.rs": "alpha(bin)::sys",  # #[path = "platform/linux.rs"] mod sys
        "alpha/tests/a.rs": "alpha/a(tests)",
        "alpha/tests/b.rs": "alpha/b(tests)",
        "alpha/tests/common/mod.rs": "alpha/a(tests)::common",  # named in the first crate
        "beta/src/lib.rs": "beta",
        "beta/tests/a.rs": "beta/a(tests)",  # not alpha's a(tests): no edges across packages
        "beta/tests/common/mod.rs": "beta/a(tests)::common",
    }
    assert edges(g) == {
        ("alpha/src/cfg.rs", "alpha/src/platform/linux.rs"),  # use super::sys
        ("alpha/src/main.rs", "alpha/src/cfg.rs"),
        ("alpha/src/main.rs", "alpha/src/platform/linux.rs"),
        ("alpha/tests/a.rs", "alpha/tests/common/mod.rs"),
        ("alpha/tests/b.rs", "alpha/tests/common/mod.rs"),  # the second crate declaring it
        ("beta/tests/a.rs", "beta/tests/common/mod.rs"),  # use crate::common::setup
    }
    assert sorted({r.kind for r in g.edges[("alpha/tests/b.rs", "alpha/tests/common/mod.rs")]}) == [
        "mod",
        "use",
    ]
    assert g.external == {}
    assert g.entry_points == {
        "alpha/src/main.rs": ["fn main", "crate root alpha(bin)", "nothing in the tree imports it"],
        "alpha/tests/a.rs": ["crate root alpha/a(tests)", "nothing in the tree imports it"],
        "alpha/tests/b.rs": ["crate root alpha/b(tests)", "nothing in the tree imports it"],
        "beta/src/lib.rs": ["nothing in the tree imports it"],
        "beta/tests/a.rs": ["crate root beta/a(tests)", "nothing in the tree imports it"],
    }  # linux.rs is a module of alpha's binary, not a stray crate root


def test_typescript_tsconfig_paths_js_extensions_and_import_require():
    g = structure("typescript-paths")
    assert edges(g) == {
        ("packages/web/main.ts", "packages/web/app/view.ts"),  # its own tsconfig: @/* -> ./app/*
        ("src/main.ts", "src/components/Button.tsx"),  # './components/Button.js' is the .tsx
        ("src/main.ts", "src/esm.mts"),  # './esm.mjs'
        ("src/main.ts", "src/legacy.ts"),  # import cfg = require('./legacy')
        ("src/main.ts", "src/lib/l.ts"),  # ~lib/* -> src/lib/*
        ("src/main.ts", "src/util/flag.ts"),  # baseUrl "."
        ("src/main.ts", "src/util/helper.ts"),  # @/* -> src/*
    }
    # The nearest tsconfig decides: packages/web has no @/util; react is a package.
    assert g.external == {"packages/web/main.ts": ["@/util"], "src/main.ts": ["react"]}


def test_typescript_unreadable_tsconfig_is_ignored(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "tsconfig.json").write_text('{ "compilerOptions": { "paths": { "@/*": [ }')
    (tmp_path / "src" / "a.ts").write_text(
        "import { b } from '@/b';\nimport { c } from './c.js';\n"
    )
    (tmp_path / "src" / "c.d.ts").write_text("export declare const c: number;\n")
    g = analyze_structure(tmp_path).graph
    assert edges(g) == {("src/a.ts", "src/c.d.ts")}  # './c.js' is typed by c.d.ts
    assert g.external == {"src/a.ts": ["@/b"]}


def test_nix_module_lists():
    g = structure("nix-modules")
    assert edges(g) == {
        ("flake.nix", "hosts/alpha/default.nix"),  # nixosSystem { modules = [ ./hosts/alpha ] }
        ("flake.nix", "modules/a.nix"),
        ("hosts/alpha/default.nix", "modules/b.nix"),  # imports = [ … ] ++ ([ … ])
        ("hosts/alpha/default.nix", "modules/default.nix"),  # ../../modules, a directory
        ("modules/a.nix", "modules/default.nix"),  # imports = [ ./. ]
    }
    kinds = {k: sorted({r.kind for r in v}) for k, v in g.edges.items()}
    assert kinds[("flake.nix", "hosts/alpha/default.nix")] == ["modules"]
    assert kinds[("hosts/alpha/default.nix", "modules/default.nix")] == ["imports"]
    assert g.entry_points == {"flake.nix": ["flake.nix", "nothing in the tree imports it"]}


def _cut_tree(root: Path) -> Path:
    """main -> y <-> z (a cycle), y -> a -> b, c; b -> c; iso.py imports nothing."""
    sources = {
        "main.py": "import y\n\nif __name__ == '__main__':\n    pass\n",
        "y.py": "import z\nimport a\n",
        "z.py": "import y\n",
        "a.py": "import b\nimport c\n",
        "b.py": "import c\n",
        "c.py": "X = 1\n",
        "iso.py": "X = 2\n",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    return root


def test_mermaid_cut_keeps_cycles_and_entry_points_and_counts_what_is_left_out(tmp_path: Path):
    g = analyze_structure(_cut_tree(tmp_path)).graph
    assert len(g.edges) == 7
    drawn = mermaid(g, max_edges=4)
    arrows = re.findall(r"m_(\w+)_py --> m_(\w+)_py", drawn.text)
    # The cycle first, then the entry point, then by name: a -> b (not a -> b, a -> c, b -> c, …)
    assert sorted(arrows) == [("a", "b"), ("main", "y"), ("y", "z"), ("z", "y")]
    assert (drawn.isolated, drawn.edges_left_out, drawn.modules_left_out) == (1, 3, 1)  # iso; c
    whole = mermaid(g)
    assert (whole.isolated, whole.edges_left_out, whole.modules_left_out) == (1, 0, 0)


def test_report_says_how_many_edges_the_diagram_leaves_out(tmp_path: Path, monkeypatch):
    import reconciler.analyze.mermaid as mermaid_module
    from reconciler.analyze.report import render_markdown
    from reconciler.analyze.run import analyze

    monkeypatch.setattr(mermaid_module, "MAX_EDGES", 4)
    report = analyze(_cut_tree(tmp_path), None, progress_enabled=False)
    assert report["mermaid_left_out"] == 1
    assert (report["mermaid_edges_left_out"], report["mermaid_modules_left_out"]) == (3, 1)
    markdown = render_markdown(report)
    assert "\n1 module(s) without any dependency are not drawn." in markdown
    assert (
        "The diagram draws 4 of 7 dependencies (those inside import cycles and from entry "
        "points first); 3 are left out, and with them 1 module(s) none of whose dependencies "
        "is drawn." in markdown
    )


def test_truncate_and_pack_stay_within_small_limits():
    for limit in range(0, 40):
        assert len(truncate("x" * 100, limit)) <= limit
    assert truncate("short", 10) == "short"
    for limit in (3, 5, 10, 20, 33):  # too small for the marker: still reduces every time
        items = ["y" * 100] * 9
        while len(items) > 1:
            groups = pack(items, limit)
            assert len(groups) < len(items)
            assert all(len("\n".join(g)) <= limit for g in groups)
            items = ["z" * 100 for _ in groups]
    with pytest.raises(ValueError):
        pack(["a", "b"], 2)


def test_budget_refuses_contexts_too_small_for_the_prompts():
    with pytest.raises(ValueError, match="--context-tokens") as refused:
        Budget(450, 256, answer_option="--overview-tokens")  # prompt_tokens 130: no room
    assert "--overview-tokens" in str(refused.value)
    with pytest.raises(ValueError, match="--max-tokens"):
        Budget(330, 96)  # fits once, but not with the halved estimate of a retry
    budget = Budget(2048, 96)
    assert budget.halved().room >= MIN_ROOM_CHARS and budget.room > budget.halved().room
