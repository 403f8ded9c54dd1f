"""TypeScript (and JavaScript), parsed with tree-sitter: `import … from`, `export … from`,
`require()` and `import()`; relative specifiers resolve the way bundlers and tsc do
(extensions, index files, `./a.js` naming `a.ts`); bare specifiers go through the nearest
tsconfig/jsconfig `paths` and `baseUrl`, and are packages when nothing there matches."""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reconciler.analyze.languages.base import (
    Definition,
    ImportRef,
    ParsedModule,
    Resolution,
    node_text,
)
from reconciler.analyze.languages.treesitter import parse_module, walk

DECLARATIONS = {
    "function_declaration": "function", "generator_function_declaration": "function",
    "class_declaration": "class", "abstract_class_declaration": "class",
    "interface_declaration": "interface", "type_alias_declaration": "type",
    "enum_declaration": "enum", "module": "namespace", "internal_module": "namespace",
}  # fmt: skip
EXTENSIONS = (".ts", ".tsx", ".d.ts", ".mts", ".cts", ".js", ".jsx", ".mjs", ".cjs")
# What tsc tries for a specifier written with the extension of the compiled output.
TS_FOR_JS = {
    ".js": (".ts", ".tsx", ".d.ts"), ".jsx": (".tsx", ".ts", ".d.ts"),
    ".mjs": (".mts", ".d.mts"), ".cjs": (".cts", ".d.cts"),
}  # fmt: skip
ENTRY_NAMES = {"main.ts", "main.tsx", "index.ts", "index.tsx", "main.js", "index.js"}
CONFIG_NAMES = ("tsconfig.json", "jsconfig.json")
_STRING = r'"(?:\\.|[^"\\\n])*"'


def lenient_json(text: str):
    """tsconfig.json is JSON with comments and trailing commas; strings are kept as they are."""
    keep = lambda match: match[0] if match[0].startswith('"') else " "  # noqa: E731
    text = re.sub(_STRING + r"|//[^\n]*|/\*.*?\*/", keep, text, flags=re.DOTALL)
    return json.loads(re.sub(_STRING + r"|,(?=\s*[}\]])", keep, text))


@dataclass(frozen=True)
class PathConfig:
    """compilerOptions.baseUrl and paths of one tsconfig/jsconfig, directories made relative
    to the tree's root."""

    base_url: str | None
    paths_base: str  # where `paths` substitutions start: baseUrl, else the config's directory
    paths: tuple[tuple[str, tuple[str, ...]], ...]

    def candidates(self, spec: str) -> list[str]:
        """Tree-relative paths to try for a bare specifier, in tsc's order: the `paths`
        pattern with the longest prefix before `*`, then baseUrl."""
        best: tuple[int, str, tuple[str, ...]] | None = None
        for pattern, substitutions in self.paths:
            prefix, star, suffix = pattern.partition("*")
            fits = len(spec) >= len(prefix) + len(suffix)
            if star and fits and spec.startswith(prefix) and spec.endswith(suffix):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), spec[len(prefix) : len(spec) - len(suffix)], substitutions)
            elif not star and spec == pattern:
                best = (len(pattern) + 1, "", substitutions)  # an exact key beats any pattern
                break
        found = []
        if best is not None:
            found += [posixpath.join(self.paths_base, s.replace("*", best[1])) for s in best[2]]
        if self.base_url is not None:
            found.append(posixpath.join(self.base_url, spec))
        return found


def _grammar(path: str) -> str:
    if path.endswith(".tsx"):
        return "tsx"
    if path.endswith((".js", ".jsx", ".mjs", ".cjs")):
        return "javascript"
    return "typescript"


def _string(node) -> str | None:
    if node is None or node.type != "string":
        return None
    return "".join(node_text(c) for c in node.named_children if c.type == "string_fragment")


def _has_type_keyword(node) -> bool:
    # `export type * from` (TypeScript 5) is newer than the grammar: an ERROR node holding `type`
    return any(
        child.type == "type" or (child.type == "ERROR" and node_text(child) == "type")
        for child in node.children
    )


def _type_only(statement) -> bool:
    """`import type …`, `export type { … } from`, or braces whose every name is marked `type`:
    tsc erases these, so they are no run-time dependency."""
    if _has_type_keyword(statement):
        return True
    clause = next(
        (c for c in statement.named_children if c.type in ("import_clause", "export_clause")), None
    )
    if clause is None:
        return False  # `import './x'` runs x; `export * from` re-exports values
    if clause.type == "import_clause":
        named = [c for c in clause.named_children if c.type == "named_imports"]
        if len(named) != len(clause.named_children):  # a default or namespace import
            return False
        specifiers = [s for n in named for s in n.named_children if s.type == "import_specifier"]
    else:
        specifiers = [s for s in clause.named_children if s.type == "export_specifier"]
    return bool(specifiers) and all(_has_type_keyword(s) for s in specifiers)


def _declarations(node, line_of) -> list[Definition]:
    found = []
    for child in node.named_children:
        target = child
        if child.type == "export_statement":
            target = child.child_by_field_name("declaration") or child
        if target.type in DECLARATIONS:
            name = node_text(target.child_by_field_name("name"))
            found.append(Definition(DECLARATIONS[target.type], name, line_of(target)))
        elif target.type in ("lexical_declaration", "variable_declaration"):
            for declarator in target.named_children:
                if declarator.type == "variable_declarator":
                    name = node_text(declarator.child_by_field_name("name"))
                    found.append(Definition("const", name, line_of(declarator)))
    return found


class TypeScriptLanguage:
    name = "typescript"

    def parse(self, path: str, source: str) -> ParsedModule:
        grammar = _grammar(path)
        language = "javascript" if grammar == "javascript" else "typescript"
        module, tree = parse_module(path, language, grammar, source)
        module.definitions = _declarations(tree.root_node, lambda n: n.start_point[0] + 1)
        for node in walk(tree.root_node):
            line = node.start_point[0] + 1
            if node.type in ("import_statement", "export_statement"):
                source = node.child_by_field_name("source")
                if source is None and node.type == "import_statement":  # import x = require()
                    clause = next(
                        (c for c in node.named_children if c.type == "import_require_clause"), None
                    )
                    source = clause.child_by_field_name("source") if clause else None
                spec = _string(source)
                if spec is not None:
                    kind = node.type.split("_")[0]
                    module.imports.append(ImportRef(spec, line, kind, type_only=_type_only(node)))
            elif node.type == "call_expression":
                function = node.child_by_field_name("function")
                arguments = node.child_by_field_name("arguments")
                kind = node_text(function) if function is not None else ""
                if (
                    kind in ("require", "import")
                    and arguments is not None
                    and arguments.named_children
                ):
                    spec = _string(arguments.named_children[0])
                    if spec is not None:
                        module.imports.append(ImportRef(spec, line, kind))
        module.imports.sort(key=lambda ref: (ref.line, ref.target))
        pure = PurePosixPath(path)
        if pure.name in ENTRY_NAMES and str(pure.parent) in (".", "src"):  # the package's own
            module.entry_hints.append(pure.name)
        return module

    def resolver(
        self, modules: list[ParsedModule], files: set[str], root: Path
    ) -> TypeScriptResolver:
        return TypeScriptResolver({m.path for m in modules}, files, root)


class TypeScriptResolver:
    def __init__(self, modules: set[str], files: set[str], root: Path) -> None:
        self.modules = modules
        self.files = files
        self.root = root
        self.configs: dict[str, PathConfig | None] = {}  # directory -> its nearest config
        self.entries = self._package_entries(files, root)

    def _config(self, directory: str) -> PathConfig | None:
        """The nearest tsconfig.json (or jsconfig.json) at or above `directory` that parses;
        as with tsc, a parent's aliases apply only through `extends`."""
        if directory not in self.configs:
            found = None
            for name in CONFIG_NAMES:
                path = posixpath.join(directory, name)
                if path in self.files:
                    found = self._read_config(path, depth=0)
                    if found:
                        break
            if found is None and directory:
                found = self._config(posixpath.dirname(directory))
            self.configs[directory] = found
        return self.configs[directory]

    def _read_config(self, path: str, depth: int) -> PathConfig | None:
        try:
            data = lenient_json((self.root / path).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            return None  # a config we cannot read changes nothing
        if not isinstance(data, dict):
            return None
        directory = posixpath.dirname(path)
        inherited = None
        parent = data.get("extends")
        if isinstance(parent, str) and parent.startswith(".") and depth < 5:
            parent = posixpath.normpath(posixpath.join(directory, parent))
            parent = parent if parent.endswith(".json") else parent + ".json"
            inherited = self._read_config(parent, depth + 1) if parent in self.files else None
        options = data.get("compilerOptions")
        options = options if isinstance(options, dict) else {}
        base_url = inherited.base_url if inherited else None
        if isinstance(options.get("baseUrl"), str):
            base_url = posixpath.normpath(posixpath.join(directory, options["baseUrl"]))
        paths = inherited.paths if inherited else ()
        paths_base = inherited.paths_base if inherited else directory
        if isinstance(options.get("paths"), dict):
            paths = tuple(
                (key, tuple(v for v in value if isinstance(v, str)))
                for key, value in options["paths"].items()
                if isinstance(value, list)
            )
            paths_base = directory
        if base_url is not None:
            paths_base = base_url
        return PathConfig(base_url, paths_base, paths)  # possibly empty: it still decides

    def _package_entries(self, files: set[str], root: Path) -> dict[str, str]:
        """Files package.json names as main, module, types or bin: entry points."""
        entries: dict[str, str] = {}
        for manifest in sorted(f for f in files if PurePosixPath(f).name == "package.json"):
            try:
                data = json.loads((root / manifest).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            named = [data.get(key) for key in ("main", "module", "types")]
            binaries = data.get("bin")
            named += list(binaries.values()) if isinstance(binaries, dict) else [binaries]
            for spec in named:
                if isinstance(spec, str):
                    found = self._lookup(
                        posixpath.dirname(manifest), "./" + spec.removeprefix("./")
                    )
                    if found:
                        entries.setdefault(
                            found, f"package.json of {posixpath.dirname(manifest) or '.'}"
                        )
        return entries

    def name(self, path: str) -> str:
        return path

    def _lookup(self, directory: str, spec: str) -> str | None:
        joined = posixpath.normpath(posixpath.join(directory, spec))
        if joined.startswith("../"):
            return None
        stem, suffix = posixpath.splitext(joined)
        for ts in TS_FOR_JS.get(suffix, ()):
            if stem + ts in self.modules:
                return stem + ts
        candidates = [
            joined,
            *(joined + e for e in EXTENSIONS),
            *(f"{joined}/index{e}" for e in EXTENSIONS),
        ]
        return next((c for c in candidates if c in self.modules), None)

    def resolve(self, module: ParsedModule, ref: ImportRef) -> Resolution:
        if ref.target.startswith((".", "/")):
            directory = posixpath.dirname(module.path)
            found = self._lookup(directory, ref.target)
            if found:
                return Resolution((found,))
            joined = posixpath.normpath(posixpath.join(directory, ref.target))
            if joined.startswith("../") or joined in self.files:
                return Resolution()  # outside the analysed tree, or data (JSON, CSS, …)
            return Resolution(
                unresolved="no such file in the tree (extensions and index files tried)"
            )
        if ref.target.startswith("node:"):
            return Resolution()
        config = self._config(posixpath.dirname(module.path))
        for candidate in config.candidates(ref.target) if config else ():
            found = self._lookup("", "./" + candidate)  # an alias (@/x) or a baseUrl path
            if found:
                return Resolution((found,))
        parts = ref.target.split("/")
        return Resolution(external="/".join(parts[:2]) if ref.target.startswith("@") else parts[0])


LANGUAGE = TypeScriptLanguage()
