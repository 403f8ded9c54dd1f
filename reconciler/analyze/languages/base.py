"""What every language parser produces and every import resolver consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Definition:
    kind: str  # function, class, struct, trait, binding, interface, ...
    name: str
    line: int


@dataclass(frozen=True)
class ImportRef:
    """One import as written; resolvers turn it into modules of the tree (or an external name)."""

    target: str  # 'a.b' (Python), 'crate::a::B' (Rust), './x.nix' (Nix), './a' (TypeScript)
    line: int
    kind: str  # import, from, mod, use, path, require, ...
    level: int = 0  # Python relative-import dots
    # Python: the names of 'from X import names'; Rust: the inline modules around the item.
    names: tuple[str, ...] = ()
    location: str = ""  # Rust: the file a `#[path = "…"]` attribute gives a `mod`
    # Needed by the type checker only (`if TYPE_CHECKING:`, `import type`): no run-time edge.
    type_only: bool = False


@dataclass
class ParsedModule:
    path: str
    language: str
    lines: int
    source: str
    definitions: list[Definition] = field(default_factory=list)
    imports: list[ImportRef] = field(default_factory=list)
    entry_hints: list[str] = field(default_factory=list)  # why this module is an entry point
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resolution:
    targets: tuple[str, ...] = ()  # module paths inside the tree
    external: str | None = None  # the package/crate name when it lies outside
    # Why an import that names something of this tree found nothing there (no targets, not
    # external): listed in the report instead of vanishing.
    unresolved: str | None = None


class Resolver(Protocol):
    entries: dict[str, str]  # module path -> why the build declares it an entry point

    def name(self, path: str) -> str: ...

    def resolve(self, module: ParsedModule, ref: ImportRef) -> Resolution: ...


class Language(Protocol):
    name: str

    def parse(self, path: str, source: str) -> ParsedModule: ...

    def resolver(self, modules: list[ParsedModule], files: set[str], root: Path) -> Resolver: ...


def count_lines(source: str) -> int:
    return source.count("\n") + (1 if source and not source.endswith("\n") else 0)


def node_text(node) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text else ""
