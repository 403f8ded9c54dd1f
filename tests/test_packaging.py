"""What ships: the wheel `pip wheel .` builds from the source tree (templates and the status page
inside, test doubles outside), and the versions it was tested with (constraints.txt)."""

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
    doubles = [
        m for m in modules if Path(m).stem in ("testing", "fakes", "conftest") or "/tests/" in m
    ]
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
            offenders += [
                f"{path.relative_to(REPO)}: {n}"
                for n in names
                if n.split(".")[0] in ("tests", "fakes")
            ]
    assert offenders == []


def test_constraints_pin_every_dependency_inside_pyprojects_ranges() -> None:
    """constraints.txt (what scripts/lib/setup.sh installs with) pins each dependency of every
    extra to one version that pyproject.toml's range allows."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")  # exact pins only
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [
        *project["dependencies"],
        *(s for extra in project["optional-dependencies"].values() for s in extra),
    ]
    for spec in specs:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
        for extra in requirement.extras:  # psycopg[binary] brings psycopg-binary
            assert canonicalize_name(f"{requirement.name}-{extra}") in pins, spec
