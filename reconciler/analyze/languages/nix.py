"""Nix, parsed with tree-sitter: a file depends on the files its path literals name, for
`import ./x.nix`, `callPackage ./x { }`, `imports = [ ./m.nix ]` (and the `modules = [ … ]` of
nixosSystem) and any literal `./y.nix`; `builtins.readDir ./dir` (how module trees load a
whole directory) stands for every `.nix` file and `default.nix` directory in it."""

from __future__ import annotations

import posixpath
from pathlib import Path, PurePosixPath

from reconciler.analyze.languages.base import (
    Definition,
    ImportRef,
    ParsedModule,
    Resolution,
    node_text,
)
from reconciler.analyze.languages.treesitter import parse_module, walk

IMPORTERS = {"import", "callPackage", "callPackages"}
DIRECTORY_READERS = {"readDir"}  # builtins.readDir ./modules: everything in it is loaded
ROOT_ENTRIES = {"flake.nix", "default.nix", "shell.nix"}
MODULE_LISTS = {"imports", "modules"}  # lists of NixOS modules: a directory means default.nix


def _function_name(node) -> str:
    """`import`, `pkgs.callPackage`, `lib.callPackageWith x` -> the last attribute name."""
    while node is not None and node.type == "apply_expression":
        node = node.child_by_field_name("function")
    if node is None:
        return ""
    if node.type == "variable_expression":
        return node_text(node.child_by_field_name("name"))
    if node.type == "select_expression":
        return node_text(node.child_by_field_name("attrpath")).split(".")[-1]
    return ""


def _context(node) -> str:
    parent = node.parent
    if parent is not None and parent.type == "apply_expression":
        if parent.child_by_field_name("argument") == node:
            name = _function_name(parent.child_by_field_name("function"))
            if name in IMPORTERS or name in DIRECTORY_READERS:
                return name
    if parent is not None and parent.type == "list_expression":
        binding = parent.parent
        while binding is not None and (  # imports = [ … ] ++ ([ … ])
            binding.type == "parenthesized_expression"
            or (
                binding.type == "binary_expression"
                and node_text(binding.child_by_field_name("operator")) == "++"
            )
        ):
            binding = binding.parent
        if binding is not None and binding.type == "binding":
            # `modules` is the module list nixosSystem, evalModules and friends take.
            name = node_text(binding.child_by_field_name("attrpath"))
            if name in MODULE_LISTS:
                return name
    return "path"


def _definitions(root) -> list[Definition]:
    node = root.child_by_field_name("expression")
    found: list[Definition] = []
    while node is not None:
        if node.type == "function_expression":
            node = node.child_by_field_name("body")
        elif node.type == "let_expression":
            found += _bindings_of(node, "let")
            node = node.child_by_field_name("body")
        elif node.type in ("attrset_expression", "rec_attrset_expression"):
            found += _bindings_of(node, "attribute")
            break
        else:
            break
    return found


def _bindings_of(node, kind: str) -> list[Definition]:
    for child in node.named_children:
        if child.type == "binding_set":
            return [
                Definition(kind, node_text(b.child_by_field_name("attrpath")), b.start_point[0] + 1)
                for b in child.named_children
                if b.type == "binding"
            ]
    return []


class NixLanguage:
    name = "nix"

    def parse(self, path: str, source: str) -> ParsedModule:
        module, tree = parse_module(path, self.name, "nix", source)
        module.definitions = _definitions(tree.root_node)
        for node in walk(tree.root_node):
            if node.type != "path_expression":
                continue
            if any(c.type != "path_fragment" for c in node.named_children):
                continue  # an interpolated path (./${name}.nix) names no single file
            module.imports.append(
                ImportRef(node_text(node), node.start_point[0] + 1, _context(node))
            )
        if PurePosixPath(path).name in ROOT_ENTRIES and "/" not in path:
            module.entry_hints.append(PurePosixPath(path).name)
        return module

    def resolver(self, modules: list[ParsedModule], files: set[str], root: Path) -> NixResolver:
        return NixResolver({m.path for m in modules})


class NixResolver:
    def __init__(self, modules: set[str]) -> None:
        self.modules = modules
        self.entries: dict[str, str] = {}
        self.children: dict[str, list[str]] = {}  # directory -> its .nix files, default.nix dirs
        for path in sorted(modules):
            pure = PurePosixPath(path)
            directory = "" if str(pure.parent) == "." else str(pure.parent)
            self.children.setdefault(directory, []).append(path)
            if pure.name == "default.nix" and directory:
                parent = posixpath.dirname(directory)
                self.children.setdefault(parent, []).append(path)

    def _directory(self, joined: str) -> Resolution:
        directory = "" if joined == "." else joined
        found = self.children.get(directory)
        if found:
            return Resolution(tuple(found))
        return Resolution(unresolved="readDir of a directory with no .nix file in the tree")

    def name(self, path: str) -> str:
        return path

    def resolve(self, module: ParsedModule, ref: ImportRef) -> Resolution:
        if not ref.target.startswith(("./", "../")):
            return Resolution()  # absolute, home or <nixpkgs> paths lie outside the tree
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(module.path), ref.target))
        if joined.startswith("../"):
            return Resolution()  # outside the analysed tree
        if ref.kind in DIRECTORY_READERS:
            return self._directory(joined)
        if joined in self.modules:
            return Resolution((joined,))
        # A directory means its default.nix, but only where Nix itself would read it.
        directory_default = "default.nix" if joined == "." else f"{joined}/default.nix"
        if ref.kind != "path" and directory_default in self.modules:
            return Resolution((directory_default,))
        if ref.kind != "path" or joined.endswith(".nix"):  # other literal paths are data
            return Resolution(unresolved="no such .nix file (or directory with default.nix)")
        return Resolution()


LANGUAGE = NixLanguage()
