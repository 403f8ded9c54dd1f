"""Issue 20, fixes 1, 2 and the Nix part of 4: the graph follows what the build and the type
checker say, each on a fixture tree written to reproduce one defect.

- Cargo: `[lib] name`, `[lib] path`, `[[bin]] path`, `package = "…"` renames and
  `workspace = true` dependencies (deploy-rs's binaries lost the link to their own library).
- Type-only imports (`if TYPE_CHECKING:`, `import type`) are marked and cycles are counted over
  run-time edges (Starlette's only cycle existed only through them).
- Nix module trees loaded with `builtins.readDir`."""

from __future__ import annotations

from pathlib import Path

from reconciler.analyze.mermaid import mermaid
from reconciler.analyze.report import build_report, render_markdown
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import skipped_summaries

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "analyze"


def structure(name: str):
    return analyze_structure(FIXTURES / name).graph


def test_cargo_lib_name_renamed_and_workspace_dependencies():
    g = structure("rust-cargo")
    assert g.names == {
        "crates/deploy/src/bin/activate.rs": "deploy_rs/activate(bin)",  # [[bin]] name
        "crates/deploy/src/cli.rs": "deploy::cli",
        "crates/deploy/src/lib.rs": "deploy",  # [lib] name, not the package deploy-rs
        "crates/deploy/src/main.rs": "deploy_rs(bin)",
        "crates/tool/src/main.rs": "tool(bin)",
        "crates/util/src/helpers.rs": "forge_util::helpers",
        "crates/util/src/util.rs": "forge_util",  # [lib] path = "src/util.rs"
    }
    assert set(g.edges) == {
        ("crates/deploy/src/main.rs", "crates/deploy/src/cli.rs"),  # use deploy::cli
        ("crates/deploy/src/bin/activate.rs", "crates/deploy/src/cli.rs"),
        ("crates/deploy/src/bin/activate.rs", "crates/deploy/src/lib.rs"),  # deploy::deploy()
        ("crates/deploy/src/lib.rs", "crates/deploy/src/cli.rs"),  # mod cli
        ("crates/deploy/src/lib.rs", "crates/util/src/helpers.rs"),  # util = {package=…}
        ("crates/tool/src/main.rs", "crates/util/src/helpers.rs"),  # ws_util = {workspace}
        ("crates/util/src/util.rs", "crates/util/src/helpers.rs"),
    }
    # Its own library is no external package; a renamed one is named by its package.
    assert g.external == {
        "crates/deploy/src/bin/activate.rs": ["serde_json"],  # json = {package="serde_json"}
        "crates/deploy/src/lib.rs": ["serde"],
    }
    assert g.unresolved == []


def test_python_type_checking_imports_are_type_only_and_form_no_cycle():
    g = structure("python-types")
    type_only = {e for e in g.edges if g.type_only(e)}
    assert type_only == {
        ("shop/models.py", "shop/service.py"),  # if TYPE_CHECKING:
        ("shop/db.py", "shop/service.py"),  # if typing.TYPE_CHECKING:
    }
    assert ("shop/db.py", "shop/fallback.py") in g.edges  # its else branch runs
    assert g.cycles() == []
    assert g.type_only_cycles() == [["shop/db.py", "shop/models.py", "shop/service.py"]]


def test_typescript_type_imports_are_type_only_and_cycles_count_runtime_edges():
    g = structure("typescript-types")
    assert {e for e in g.edges if g.type_only(e)} == {
        ("src/b.ts", "src/a.ts"),  # import type { A }
        ("src/b.ts", "src/c.ts"),  # import { type C, type D }: every name a type
        ("src/index.ts", "src/a.ts"),  # export type { A } from
        ("src/index.ts", "src/c.ts"),  # export type * from (TypeScript 5)
    }
    assert not g.type_only(("src/b.ts", "src/e.ts"))  # { type E, f }: f is a value
    assert g.cycles() == [["src/b.ts", "src/e.ts"]]
    assert g.type_only_cycles() == [["src/a.ts", "src/b.ts", "src/c.ts", "src/e.ts"]]


def test_type_only_edges_in_the_json_the_diagram_and_the_cycle_list():
    structure_ = analyze_structure(FIXTURES / "typescript-types")
    report = build_report(structure_, skipped_summaries(structure_.graph, "", "", "off"), {})
    marked = {(e["from"], e["to"]) for e in report["edges"] if e["type_only"]}
    assert marked == {
        ("src/b.ts", "src/a.ts"),
        ("src/b.ts", "src/c.ts"),
        ("src/index.ts", "src/a.ts"),
        ("src/index.ts", "src/c.ts"),
    }
    assert report["totals"]["cycles"] == 1 and report["totals"]["type_only_cycles"] == 1
    dashed = [line for line in report["mermaid"].splitlines() if "-.->" in line]
    assert sorted(dashed) == [
        "  m_src_b_ts -.-> m_src_a_ts",
        "  m_src_b_ts -.-> m_src_c_ts",
        "  m_src_index_ts -.-> m_src_a_ts",
        "  m_src_index_ts -.-> m_src_c_ts",
    ]
    markdown = render_markdown(report)
    cycles = markdown.split("## Import cycles")[1].split("##")[0]
    assert "- 2 modules: `src/b.ts` → `src/e.ts` → `src/b.ts`" in cycles
    assert "Through type-only imports only" in cycles and "4 modules" in cycles


def test_nix_read_dir_loads_every_module_of_the_directory():
    g = structure("nix-readdir")
    kinds = {edge: sorted({r.kind for r in refs}) for edge, refs in g.edges.items()}
    assert kinds == {
        ("flake.nix", "modules/a.nix"): ["readDir"],
        ("flake.nix", "modules/b.nix"): ["readDir"],
        ("flake.nix", "modules/c/default.nix"): ["readDir"],  # a directory: its default.nix
        ("flake.nix", "hosts/default.nix"): ["modules"],
        ("hosts/default.nix", "hosts/profiles/x.nix"): ["readDir"],
    }
    assert g.unresolved == []


def test_mermaid_of_a_tree_without_type_only_edges_has_no_dashes():
    assert "-.->" not in mermaid(structure("rust-cargo")).text
