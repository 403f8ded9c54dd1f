"""Python, parsed with the standard `ast`: definitions, every import (lazy ones inside functions
too), and package-aware resolution of absolute and relative imports."""

from __future__ import annotations

import ast
import posixpath
import sys
import tomllib
from pathlib import Path, PurePosixPath

from reconciler.analyze.languages.base import (
    Definition,
    ImportRef,
    ParsedModule,
    Resolution,
    count_lines,
)


def _definitions(tree: ast.Module) -> list[Definition]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append(Definition("function", node.name, node.lineno))
        elif isinstance(node, ast.ClassDef):
            found.append(Definition("class", node.name, node.lineno))
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append(Definition("method", f"{node.name}.{item.name}", item.lineno))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING` (any module's attribute of that name)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(tree: ast.Module):
    """Every import statement anywhere in the file (lazy ones in functions too), and whether
    it sits in the body of an `if TYPE_CHECKING:` (never executed: no run-time edge)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, typing = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, typing
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(child, True) for child in node.body]
            stack += [(child, typing) for child in node.orelse]
        else:
            stack += [(child, typing) for child in ast.iter_child_nodes(node)]


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    names = {p.id for p in parts if isinstance(p, ast.Name)}
    values = {p.value for p in parts if isinstance(p, ast.Constant)}
    return "__name__" in names and "__main__" in values


class PythonLanguage:
    name = "python"

    def parse(self, path: str, source: str) -> ParsedModule:
        module = ParsedModule(path, self.name, count_lines(source), source)
        try:
            tree = ast.parse(source, filename=path)
        except (SyntaxError, ValueError) as exc:
            module.errors.append(f"syntax error: {exc}")
            return module
        module.definitions = _definitions(tree)
        for node, typing in _import_nodes(tree):
            if isinstance(node, ast.Import):
                module.imports += [
                    ImportRef(alias.name, node.lineno, "import", type_only=typing)
                    for alias in node.names
                ]
            else:
                names = tuple(alias.name for alias in node.names if alias.name != "*")
                module.imports.append(
                    ImportRef(
                        node.module or "", node.lineno, "from", node.level, names, type_only=typing
                    )
                )
        module.imports.sort(key=lambda ref: (ref.line, ref.target, ref.names))
        if PurePosixPath(path).name == "__main__.py":
            module.entry_hints.append("__main__.py")
        if any(_is_main_guard(node) for node in tree.body):
            module.entry_hints.append("if __name__ == '__main__'")
        return module

    def resolver(self, modules: list[ParsedModule], files: set[str], root: Path) -> PythonResolver:
        return PythonResolver(modules, files, root)


ABOVE_ROOT = ".."  # the import root of a tree whose root directory is itself a package


def _package_prefix(files: set[str], root: Path) -> list[str]:
    """When the root is a package (root/__init__.py), the dotted names of its enclosing
    packages: analysing `src/mypkg` names its modules mypkg.a, so `from mypkg import b`
    resolves. Parents above the root are read from disk; they are not in the walk."""
    if "__init__.py" not in files:
        return []
    prefix = [root.name]
    directory = root.parent
    while directory != directory.parent and (directory / "__init__.py").is_file():
        prefix.insert(0, directory.name)
        directory = directory.parent
    return prefix


class PythonResolver:
    """A module's dotted name comes from the chain of directories holding __init__.py above it;
    the first directory without one is its import root (so `src/` layouts work)."""

    def __init__(self, modules: list[ParsedModule], files: set[str], root: Path) -> None:
        self.files = files
        self.prefix = _package_prefix(files, root)
        self.names: dict[str, str] = {}
        self.roots: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = {}
        for module in modules:
            name, import_root = self._dotted(module.path)
            self.names[module.path] = name
            self.roots[module.path] = import_root
            self.by_name.setdefault(name, []).append(module.path)
        self.entries = self._scripts(files, root)

    def _scripts(self, files: set[str], root: Path) -> dict[str, str]:
        """Modules pyproject.toml names in [project.scripts] / [project.gui-scripts]."""
        entries: dict[str, str] = {}
        for manifest in sorted(f for f in files if PurePosixPath(f).name == "pyproject.toml"):
            try:
                project = tomllib.loads((root / manifest).read_text(encoding="utf-8")).get(
                    "project", {}
                )
            except (OSError, ValueError):
                continue
            for table in ("scripts", "gui-scripts"):
                for script, target in sorted(project.get(table, {}).items()):
                    dotted = str(target).split(":")[0].strip()
                    found = self.by_name.get(dotted)
                    if found:
                        entries.setdefault(sorted(found)[0], f"script {script!r} in {manifest}")
        return entries

    def _dotted(self, path: str) -> tuple[str, str]:
        pure = PurePosixPath(path)
        parts = [] if pure.stem == "__init__" else [pure.stem]
        directory = pure.parent
        while str(directory) != "." and str(directory / "__init__.py") in self.files:
            parts.insert(0, directory.name)
            directory = directory.parent
        if str(directory) == "." and self.prefix:  # the chain goes on above the tree's root
            return ".".join([*self.prefix, *parts]), ABOVE_ROOT
        return ".".join(parts) or pure.parent.name, str(directory)

    def name(self, path: str) -> str:
        return self.names[path]

    def _find(self, dotted: str, importer: str) -> str | None:
        candidates = self.by_name.get(dotted, [])
        if not candidates:
            return self._by_path(dotted, importer)
        same_root = [c for c in candidates if self.roots[c] == self.roots[importer]]
        return sorted(same_root or candidates)[0]

    def _by_path(self, dotted: str, importer: str) -> str | None:
        """A module inside namespace packages (directories without __init__.py) has no dotted
        name of its own here; find its file from the importer's import root, then the tree's."""
        parts = dotted.split(".")
        bases: list[tuple[str, list[str]]] = []
        if self.prefix:
            if parts[: len(self.prefix)] == self.prefix:
                bases.append((".", parts[len(self.prefix) :]))
        else:
            bases += [(self.roots[importer], parts), (".", parts)]
        for base, rest in bases:
            if not rest or base == ABOVE_ROOT:
                continue
            stem = "/".join(rest) if base == "." else "/".join([base, *rest])
            for candidate in (f"{stem}.py", f"{stem}.pyi", f"{stem}/__init__.py"):
                if candidate in self.names:
                    return candidate
        return None

    def _longest(self, dotted: str, importer: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            found = self._find(".".join(parts[:end]), importer)
            if found:
                return found
        return None

    def _namespace_directory(self, package: str, dotted: str) -> bool:
        """`import pkg.sub` of a directory without __init__.py (a namespace package): no
        module to point at, nothing missing either."""
        rest = dotted.split(".")[len(self.names[package].split(".")) :]
        directory = posixpath.join(posixpath.dirname(package), *rest) + "/"
        return any(f.startswith(directory) for f in self.files)

    def resolve(self, module: ParsedModule, ref) -> Resolution:
        base = ref.target
        if ref.level:
            package = self.names[module.path].split(".")
            if PurePosixPath(module.path).stem != "__init__":
                package = package[:-1]
            if ref.level - 1 > len(package):
                return Resolution(unresolved="relative import beyond the top-level package")
            package = package[: len(package) - (ref.level - 1)]
            base = ".".join([*package, *([ref.target] if ref.target else [])])
        targets: list[str] = []
        # 'from pkg import submodule' imports the submodule; any other name (or *) comes
        # from pkg itself, so `from pkg import helpers, VERSION` depends on both.
        from_base = not ref.names
        for name in ref.names:
            found = self._find(f"{base}.{name}" if base else name, module.path)
            if found:
                targets.append(found)
            else:
                from_base = True
        if from_base and base:
            found = self._find(base, module.path) or self._longest(base, module.path)
            if found and found.endswith("__init__.py") and self.names[found] != base:
                # A package of this tree without that module: naming the package instead
                # would invent an edge (and hide a file the walk may have left out).
                if self._namespace_directory(found, base):
                    return Resolution(tuple(dict.fromkeys(targets)))
                missing = f"no module {base} in the tree (package {self.names[found]} has none)"
                return Resolution(tuple(dict.fromkeys(targets)), unresolved=missing)
            if found:
                targets.append(found)
        if targets:
            return Resolution(tuple(dict.fromkeys(targets)))
        if ref.level:
            return Resolution(unresolved=f"no module {base or '.'} in the tree")
        top = base.split(".")[0]
        return Resolution(external=None if top in sys.stdlib_module_names else top)


LANGUAGE = PythonLanguage()
