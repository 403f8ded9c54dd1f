"""Optional dependencies are extras (`analyze`, `postgres`, `cpu`): without one, everything
else still imports and runs, and the feature that needs it fails with an error naming the
extra to install. "Not installed" is simulated in a fresh interpreter by a None entry in
sys.modules, which makes `import` raise ModuleNotFoundError exactly as for a missing package."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

import reconciler
from reconciler.extras import EXTRAS

ALL_OPTIONAL = [module for modules in EXTRAS.values() for module in modules]


def run_without(
    modules: list[str], code: str, home: Path, **env: str
) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter in which `modules` cannot be imported."""
    prelude = f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "TF_STATE_DIR": str(home / "state"), **env},
    )  # fmt: skip


def cli_without(modules: list[str], home: Path, *argv: str) -> subprocess.CompletedProcess:
    return run_without(
        modules, f"from reconciler.cli import main\nsys.exit(main({list(argv)!r}))", home
    )


def test_extras_match_pyproject():
    """reconciler/extras.py names the same distributions as pyproject.toml's extras."""
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra, modules in EXTRAS.items():
        declared = {re.match(r"[A-Za-z0-9._-]+", spec)[0].lower() for spec in optional[extra]}
        assert declared == set(modules.values()), extra


@pytest.mark.parametrize(("missing", "distribution"), [
    ("tree_sitter_language_pack", "tree-sitter-language-pack"), ("openai", "openai"),
])  # fmt: skip
def test_analyze_without_its_extra_names_it_and_writes_nothing(
    tmp_path: Path, missing, distribution
):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("import os\n")
    report = tmp_path / "report.md"
    done = cli_without(
        [missing],
        tmp_path,
        "analyze",
        str(tmp_path / "src"),
        "--no-summaries",
        "-q",
        "-o",
        str(report),
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: tensorforge analyze needs {distribution}, which is not installed: "
        "install tensorforge[analyze] (pip install 'tensorforge[analyze]')"
    )
    assert not report.exists()


def test_the_analyze_modules_name_the_extra_when_imported_without_it(tmp_path: Path):
    done = run_without(["openai"], "import reconciler.analyze.summarize", tmp_path)
    assert done.returncode == 1
    assert "reconciler.extras.MissingExtra: tensorforge analyze needs openai" in done.stderr
    assert "install tensorforge[analyze]" in done.stderr


def test_the_postgres_registry_without_its_extra_names_it(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    code = f"from pathlib import Path\nfrom reconciler.models.pull import registry_for\nregistry_for(Path({str(models)!r}))"
    done = run_without(
        ["psycopg"], code, tmp_path, TF_REGISTRY_URL="postgresql://tf@127.0.0.1:9/tf"
    )
    assert done.returncode == 1
    assert "needs psycopg, which is not installed: install tensorforge[postgres]" in done.stderr
    assert list(models.iterdir()) == []  # no SQLite registry made instead


def test_the_embedded_llama_server_without_its_extra_names_it(tmp_path: Path):
    code = "from reconciler.backends.llamacpp_server import main\nsys.exit(main(['--model', 'm.gguf']))"
    done = run_without(["xllamacpp"], code, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "error: the embedded llama.cpp server (no llama-server binary configured) needs xllamacpp"
    )
    assert "install tensorforge[cpu]" in done.stderr


def test_without_any_extra_every_other_module_imports_and_the_host_commands_run(tmp_path: Path):
    """Only modules that are an extra's feature may fail to import, and only with MissingExtra."""
    walk = pkgutil.walk_packages(reconciler.__path__, "reconciler.")
    names = [m.name for m in walk if not m.name.endswith(".__main__")]  # those run a command
    code = (
        "import importlib, json\nfrom reconciler.extras import MissingExtra\nfailed = {}\n"
        f"for name in {names!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except MissingExtra as exc:\n        failed[name] = exc.extra\n"
        "print(json.dumps(failed))"
    )
    done = run_without(ALL_OPTIONAL, code, tmp_path)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout)
    assert failed and set(failed.values()) == {"analyze"}
    assert all(name.startswith("reconciler.analyze.") for name in failed), failed
    config = str(REPO / "hosts" / "cpu-dev.yaml")
    done = cli_without(ALL_OPTIONAL, tmp_path, "validate", "--config", config, "--no-file-checks")
    assert done.returncode == 0, done.stderr
    done = cli_without(
        ALL_OPTIONAL, tmp_path, "render", "--config", config, "--out", str(tmp_path / "units")
    )
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "units").glob("*.service"))
