"""What ships: the wheel `pip wheel .` builds from the source tree (templates and the status page
inside, test doubles outside)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """Every path in the wheel built from a copy of the tree (the in-tree build/ must not land
    in the checkout), built once for this module."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in"):
        shutil.copy(REPO / name, source / name)
    for name in ("reconciler", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no setuptools>=77 reachable for the isolated build")
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("tensorforge-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.slow  # builds the wheel (seconds)
def test_the_wheel_carries_the_templates(wheel_names: set[str]) -> None:
    """setup.py's build step copies every unit template into the package."""
    for template in (REPO / "templates").glob("*.j2"):
        assert f"reconciler/units/templates/{template.name}" in wheel_names


@pytest.mark.slow  # builds the wheel (seconds)
def test_the_wheel_carries_the_status_page(wheel_names: set[str]) -> None:
    """An installed gateway (wheel, Nix package) serves the page from package data."""
    for asset in ("index.html", "app.js", "style.css"):
        assert f"reconciler/gateway/static/{asset}" in wheel_names


@pytest.mark.slow  # builds the wheel (seconds)
def test_the_wheel_ships_no_test_doubles(wheel_names: set[str]) -> None:
    """Fake upstreams, the fake hub and the throwaway PostgreSQL live under tests/fakes/."""
    tops = {name.split("/", 1)[0] for name in wheel_names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"reconciler"}
    modules = [name for name in wheel_names if name.endswith(".py")]
    assert len(modules) > 50  # the package itself is there
    doubles = [m for m in modules if Path(m).stem in ("testing", "fakes", "conftest") or "/tests/" in m]
    assert doubles == []


def test_the_package_never_imports_the_test_doubles() -> None:
    """An installed TensorForge has no tests/ beside it: nothing in reconciler/ may need it."""
    offenders = []
    for path in sorted((REPO / "reconciler").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("tests", "fakes")]
    assert offenders == []
