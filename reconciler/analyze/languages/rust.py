"""Rust, parsed with tree-sitter: the module tree follows `mod` declarations from each crate
root (main.rs, lib.rs, src/bin/*, build.rs, tests/, examples/, benches/), `#[path]` included,
and `use` paths (crate::, self::, super::, sibling crates of the workspace) resolve along it."""

from __future__ import annotations

import posixpath
from collections import deque
from pathlib import Path, PurePosixPath

from reconciler.analyze.languages.base import (
    Definition,
    ImportRef,
    ParsedModule,
    Resolution,
    node_text,
)
from reconciler.analyze.languages.cargo import Package, crate_name, read_packages
from reconciler.analyze.languages.treesitter import parse_module

ITEMS = {
    "function_item": "function", "struct_item": "struct", "enum_item": "enum",
    "trait_item": "trait", "type_item": "type", "const_item": "const", "static_item": "static",
    "union_item": "union", "macro_definition": "macro", "mod_item": "mod",
}  # fmt: skip
STANDARD_CRATES = {"std", "core", "alloc", "proc_macro", "test"}
PATH_NODES = {"scoped_identifier", "scoped_type_identifier"}


def _segments(text: str) -> list[str]:
    return [part.strip() for part in text.split("::") if part.strip()]


def expand_use(node, prefix: list[str]) -> list[list[str]]:
    """All paths one `use` tree names: `a::{b, c::D as E, f::*}` -> a::b, a::c::D, a::f."""
    kind = node.type
    if kind == "use_list":
        return [p for child in node.named_children for p in expand_use(child, prefix)]
    if kind == "scoped_use_list":
        path = node.child_by_field_name("path")
        inner = prefix + (_segments(node_text(path)) if path is not None else [])
        return expand_use(node.child_by_field_name("list"), inner)
    if kind == "use_as_clause":
        return expand_use(node.child_by_field_name("path"), prefix)
    if kind == "use_wildcard":
        named = node.named_children
        return [prefix + (_segments(node_text(named[0])) if named else [])]
    segments = prefix + _segments(node_text(node))
    if len(segments) > 1 and segments[-1] == "self":
        segments = segments[:-1]
    return [segments]


def _impl_name(node) -> str:
    trait = node.child_by_field_name("trait")
    target = node_text(node.child_by_field_name("type"))
    return f"{node_text(trait)} for {target}" if trait is not None else target


class RustLanguage:
    name = "rust"

    def parse(self, path: str, source: str) -> ParsedModule:
        module, tree = parse_module(path, self.name, "rust", source)
        for node in tree.root_node.named_children:
            if node.type in ITEMS:
                name = node_text(node.child_by_field_name("name"))
                module.definitions.append(
                    Definition(ITEMS[node.type], name, node.start_point[0] + 1)
                )
                if node.type == "function_item" and name == "main":
                    module.entry_hints.append("fn main")
            elif node.type == "impl_item":
                module.definitions.append(
                    Definition("impl", _impl_name(node), node.start_point[0] + 1)
                )
        self._collect(tree.root_node, (), module)
        module.imports.sort(key=lambda ref: (ref.line, ref.kind, ref.target))
        return module

    def _collect(self, node, inline: tuple[str, ...], module: ParsedModule) -> None:
        location = ""  # from a #[path] attribute, for the item that follows it
        for child in node.named_children:
            line = child.start_point[0] + 1
            if child.type == "attribute_item":
                location = _path_attribute(child) or location
                continue
            if child.type in ("line_comment", "block_comment"):
                continue
            pending, location = location, ""
            if child.type == "mod_item":
                name = node_text(child.child_by_field_name("name"))
                body = child.child_by_field_name("body")
                if body is None:
                    module.imports.append(
                        ImportRef(name, line, "mod", names=inline, location=pending)
                    )
                else:
                    self._collect(body, (*inline, name), module)
            elif child.type == "use_declaration":
                for path in expand_use(child.child_by_field_name("argument"), []):
                    module.imports.append(ImportRef("::".join(path), line, "use", names=inline))
            elif child.type == "extern_crate_declaration":
                name = node_text(child.child_by_field_name("name"))
                module.imports.append(ImportRef(name, line, "extern crate", names=inline))
            elif child.type in PATH_NODES and node.type not in PATH_NODES:
                text = node_text(child)
                if text.startswith("crate::"):  # a fully qualified path used without `use`
                    module.imports.append(ImportRef(text, line, "path", names=inline))
                elif _may_name_a_crate(text):  # `deploy::init_logger(…)`, no `use` needed
                    module.imports.append(ImportRef(text, line, "qualified", names=inline))
                self._collect(child, inline, module)
            else:
                self._collect(child, inline, module)

    def resolver(self, modules: list[ParsedModule], files: set[str], root: Path) -> RustResolver:
        return RustResolver(modules, files, root)


def _may_name_a_crate(text: str) -> bool:
    """`name::item` whose first segment could be a crate (snake_case, not a keyword or the
    standard library); the resolver keeps it only when a library of the tree has that name."""
    first, separator, _ = text.partition("::")
    return (
        bool(separator)
        and first.isidentifier()
        and first.islower()
        and first not in (STANDARD_CRATES | {"self", "super", "crate"})
    )


def _path_attribute(node) -> str:
    """The file of `#[path = "platform/linux.rs"]`, or "" for any other attribute."""
    attribute = next((c for c in node.named_children if c.type == "attribute"), None)
    if attribute is None or not attribute.named_children:
        return ""
    if node_text(attribute.named_children[0]) != "path":
        return ""
    value = attribute.child_by_field_name("value")
    if value is None or value.type != "string_literal":
        return ""
    return "".join(node_text(c) for c in value.named_children if c.type == "string_content")


class RustResolver:
    def __init__(self, modules: list[ParsedModule], files: set[str], root: Path) -> None:
        self.files = files
        self.modules = {m.path: m for m in modules}
        self.place: dict[
            str, tuple[str, tuple[str, ...]]
        ] = {}  # path -> (crate label, module path)
        self.by_place: dict[tuple[str, tuple[str, ...]], str] = {}
        self.crate_roots: dict[str, str] = {}  # crate label -> root file
        self.libraries: dict[str, str] = {}  # library crate name -> label
        self.mod_targets: dict[tuple[str, int, str], str] = {}
        self.by_attribute: set[str] = set()  # files a #[path] attribute loads
        self.entries: dict[str, str] = {}
        self.packages = read_packages(files, root)
        self.package_of: dict[str, Package] = {}  # crate label -> the package it belongs to
        self.lib_of: dict[str, str] = {}  # package name -> its library's crate label
        for path in sorted(self.modules):
            label = self._crate_label(PurePosixPath(path))
            if label:
                self._add_crate(label, path)
        for path in sorted(self.modules):  # files no `mod` reaches become crates of their own
            if path not in self.place:
                self._add_crate(f"{PurePosixPath(path).stem}({path})", path)

    def _crate_label(self, path: PurePosixPath) -> str | None:
        """Binaries, tests, examples and benches carry their package's name: two packages of a
        workspace may both have a tests/integration.rs, and they are different crates. A
        library is named as code names it: `[lib] name`, which may differ from the package."""
        for package in self.packages.values():
            if str(path) == package.lib_path:
                self.package_of[package.lib_name] = package
                self.libraries[package.lib_name] = package.lib_name
                self.lib_of[package.name] = package.lib_name
                return package.lib_name
            if str(path) in package.bins:
                return self._labelled(
                    path.parent, f"/{package.bins[str(path)] or path.stem}(bin)", package
                )
        parent = path.parent
        if parent.name == "src" and path.name == "lib.rs":  # no manifest: the directory names it
            label = self._labelled(parent.parent, "")
            self.libraries[label] = label
            return label
        if parent.name == "src" and path.name == "main.rs":
            return self._labelled(parent.parent, "(bin)")
        if parent.name == "bin" and parent.parent.name == "src":
            return self._labelled(parent.parent.parent, f"/{path.stem}(bin)")
        if path.name == "build.rs" and parent.name != "src":
            return self._labelled(parent, "(build)")
        if parent.name in ("tests", "examples", "benches") and path.name != "mod.rs":
            return self._labelled(parent.parent, f"/{path.stem}({parent.name})")
        return None

    def _labelled(
        self, directory: PurePosixPath, suffix: str, package: Package | None = None
    ) -> str:
        """`package` + suffix; remembers the package, whose dependencies the crate may `use`."""
        package = package or self.packages.get("" if str(directory) == "." else str(directory))
        name = crate_name(package.name) if package else directory.name or "crate"
        if package is not None:
            self.package_of[name + suffix] = package
        return name + suffix

    def _add_crate(self, label: str, root_path: str) -> None:
        self.crate_roots[label] = root_path
        if label.endswith(("(bin)", "(build)", "(tests)", "(examples)", "(benches)")):
            self.entries[root_path] = f"crate root {label}"
        # Every crate walks its own module tree: a tests/common/mod.rs that tests/a.rs and
        # tests/b.rs both declare belongs to both crates, with an edge from each.
        seen = {root_path}
        queue: deque[tuple[str, tuple[str, ...]]] = deque([(root_path, ())])
        self._register(root_path, label, ())
        while queue:
            path, segments = queue.popleft()
            owns_directory = path == root_path or path in self.by_attribute
            for ref in self.modules[path].imports:
                if ref.kind != "mod":
                    continue
                child = self._child_file(path, ref, owns_directory)
                if child is None:
                    continue
                self.mod_targets[(path, ref.line, ref.target)] = child
                if ref.location:
                    self.by_attribute.add(child)
                if child in seen:
                    continue
                seen.add(child)
                child_segments = (*segments, *ref.names, ref.target)
                self._register(child, label, child_segments)
                queue.append((child, child_segments))

    def _register(self, path: str, label: str, segments: tuple[str, ...]) -> None:
        # A file's name is its place in the first crate that reaches it; a crate root is
        # always named after its own crate.
        if not segments or path not in self.place:
            self.place[path] = (label, segments)
        self.by_place[(label, segments)] = path

    def _child_file(self, path: str, ref: ImportRef, owns_directory: bool) -> str | None:
        pure = PurePosixPath(path)
        if ref.location and not ref.names:  # rustc: relative to the declaring file's directory
            directory = pure.parent
        elif owns_directory or pure.name == "mod.rs":
            directory = pure.parent
        else:
            directory = pure.parent / pure.stem
        directory = directory.joinpath(*ref.names) if ref.names else directory
        if ref.location:
            candidates = [PurePosixPath(posixpath.normpath(directory / ref.location))]
        else:
            candidates = [directory / f"{ref.target}.rs", directory / ref.target / "mod.rs"]
        for candidate in candidates:
            if str(candidate) in self.files and str(candidate) in self.modules:
                return str(candidate)
        return None

    def name(self, path: str) -> str:
        label, segments = self.place[path]
        return "::".join((label, *segments))

    def _longest(self, label: str, segments: list[str]) -> str | None:
        for end in range(len(segments), -1, -1):
            found = self.by_place.get((label, tuple(segments[:end])))
            if found:
                return found
        return None

    def resolve(self, module: ParsedModule, ref: ImportRef) -> Resolution:
        label, own = self.place[module.path]
        if ref.kind == "mod":
            child = self.mod_targets.get((module.path, ref.line, ref.target))
            if child:
                return Resolution((child,))
            return Resolution(
                unresolved=f"no file for `mod {ref.target};` ({ref.target}.rs or {ref.target}/mod.rs)"
            )
        current = [*own, *ref.names]
        path = _segments(ref.target)
        if not path:
            return Resolution()
        first = path[0]
        if ref.kind == "extern crate":
            return self._crate(label, first, [])
        if ref.kind == "qualified":  # only a library of this tree; anything else is a type path
            if self._library(label, first) is None:  # checked first: most paths are types
                return Resolution()
            if (label, (*current, first)) in self.by_place or first in self._inline_mods(module):
                return Resolution()  # a module of this crate with the library's name
            return self._crate(label, first, path[1:])
        if first == "crate":
            absolute = path[1:]
        elif first == "self":
            absolute = current + path[1:]
        elif first == "super":
            ups = len(path) - len(list(_drop_supers(path)))
            absolute = current[: max(0, len(current) - ups)] + list(_drop_supers(path))
        elif not ref.names and first in self._inline_mods(module):
            return Resolution()  # an inline module of this very file
        elif (label, (*current, first)) in self.by_place:
            absolute = current + path
        else:
            return self._crate(label, first, path[1:])
        found = self._longest(label, absolute)
        return Resolution((found,) if found else ())

    def _inline_mods(self, module: ParsedModule) -> set[str]:
        """`mod x { … }` of this file; a `mod x;` is a file of its own, reached by `use x::`."""
        declared = {r.target for r in module.imports if r.kind == "mod" and not r.names}
        return {d.name for d in module.definitions if d.kind == "mod"} - declared

    def _library(self, label: str, name: str) -> str | None:
        """The crate label of the tree's library that `name` names from crate `label`."""
        package = self.package_of.get(label)
        if package is not None and name in package.dependencies:
            return self.lib_of.get(package.dependencies[name])
        return self.libraries.get(name)

    def _crate(self, label: str, name: str, rest: list[str]) -> Resolution:
        """`name::rest` used from crate `label`: a dependency its package declares (perhaps
        renamed), else a library of the tree by its crate name, else outside."""
        package = self.package_of.get(label)
        if package is not None and name in package.dependencies:
            real = package.dependencies[name]
            if real in self.lib_of:
                found = self._longest(self.lib_of[real], rest)
                return Resolution((found,) if found else ())
            if real != name and crate_name(real) not in self.libraries:
                return Resolution(external=real)  # renamed: report the package, not the alias
        if name in self.libraries:
            found = self._longest(self.libraries[name], rest)
            return Resolution((found,) if found else ())
        if name in STANDARD_CRATES or name.startswith("$"):
            return Resolution()
        return Resolution(external=name)


def _drop_supers(path: list[str]):
    index = 0
    while index < len(path) and path[index] == "super":
        index += 1
    return path[index:]


LANGUAGE = RustLanguage()
