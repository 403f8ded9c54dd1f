"""What Cargo manifests say about crate names: the `[lib] name` a package's binaries and
other packages `use` (not always the package name), explicit `[lib]`/`[[bin]]` paths, and
dependencies renamed with `package = "…"`, inherited from `[workspace.dependencies]` with
`workspace = true`."""

from __future__ import annotations

import posixpath
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

DEPENDENCY_TABLES = ("dependencies", "dev-dependencies", "build-dependencies")


def crate_name(name: str) -> str:
    return name.replace("-", "_")


@dataclass
class Package:
    directory: str  # tree-relative, "" for the root
    name: str  # as written in [package] name
    lib_name: str  # the crate name code uses: [lib] name, else the package name with '_'
    lib_path: str  # tree-relative root file of the library ([lib] path, else src/lib.rs)
    bins: dict[str, str] = field(default_factory=dict)  # root file -> [[bin]] name
    # The name code writes (`use foo::…`) -> the package it names: `foo = { package = "bar" }`
    dependencies: dict[str, str] = field(default_factory=dict)


def _read(root: Path, manifest: str) -> dict:
    try:
        data = tomllib.loads((root / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # an unreadable manifest changes nothing: conventions still apply
    return data if isinstance(data, dict) else {}


def _dependency_tables(data: dict) -> list[dict]:
    tables = [data.get(t) for t in DEPENDENCY_TABLES]
    for target in (data.get("target") or {}).values():  # [target.'cfg(unix)'.dependencies]
        if isinstance(target, dict):
            tables += [target.get(t) for t in DEPENDENCY_TABLES]
    return [t for t in tables if isinstance(t, dict)]


def _dependencies(data: dict, inherited: dict[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for table in _dependency_tables(data):
        for key, spec in table.items():
            package = key
            if isinstance(spec, dict):
                if spec.get("workspace") is True:
                    package = inherited.get(key, key)
                elif isinstance(spec.get("package"), str):
                    package = spec["package"]
            found[crate_name(key)] = package
    return found


def _workspace_renames(data: dict) -> dict[str, str]:
    """[workspace.dependencies] key -> package, for members' `key = { workspace = true }`."""
    table = (data.get("workspace") or {}).get("dependencies") or {}
    renames = {}
    for key, spec in table.items() if isinstance(table, dict) else ():
        renamed = spec.get("package") if isinstance(spec, dict) else None
        renames[key] = renamed if isinstance(renamed, str) else key
    return renames


def read_packages(files: set[str], root: Path) -> dict[str, Package]:
    """Every package of the tree by directory. A workspace root's dependency renames apply to
    the members below it (the nearest workspace manifest above a package)."""
    manifests = {posixpath.dirname(f): f for f in files if PurePosixPath(f).name == "Cargo.toml"}
    data = {d: _read(root, m) for d, m in manifests.items()}
    workspaces = {d: _workspace_renames(v) for d, v in data.items() if "workspace" in v}
    packages: dict[str, Package] = {}
    for directory, manifest in sorted(data.items()):
        info = manifest.get("package")
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            continue  # a virtual workspace manifest
        inherited = _nearest(workspaces, directory)
        lib = manifest.get("lib")
        lib = lib if isinstance(lib, dict) else {}
        lib_name = _text(lib.get("name"), info["name"])
        lib_path = _text(lib.get("path"), "src/lib.rs")
        package = Package(
            directory,
            info["name"],
            crate_name(lib_name),
            _join(directory, lib_path),
            dependencies=_dependencies(manifest, inherited),
        )
        for binary in manifest.get("bin") or []:
            if isinstance(binary, dict) and isinstance(binary.get("path"), str):
                name = _text(binary.get("name"), "")
                package.bins[_join(directory, binary["path"])] = name
        packages[directory] = package
    return packages


def _text(value: object, default: str) -> str:
    return value if isinstance(value, str) else default


def _join(directory: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(directory, path))


def _nearest(workspaces: dict[str, dict[str, str]], directory: str) -> dict[str, str]:
    current = directory
    while True:
        if current in workspaces:
            return workspaces[current]
        if not current:
            return {}
        current = posixpath.dirname(current)
