"""Walking a source tree the way git sees it: .gitignore files (nested ones too) are honoured,
binary and oversized files are left out, each file gets a language from its name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pathspec

# Extension -> language. Only some languages are parsed; the rest are counted.
EXTENSIONS: dict[str, str] = {
    ".py": "python", ".pyi": "python",
    ".rs": "rust",
    ".nix": "nix",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".js": "javascript", ".jsx": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".sh": "shell", ".bash": "shell",
    ".md": "markdown", ".rst": "restructuredtext",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json",
    ".j2": "jinja", ".jinja": "jinja",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
    ".go": "go", ".java": "java", ".html": "html", ".css": "css", ".sql": "sql",
}  # fmt: skip
NAMES: dict[str, str] = {
    "Dockerfile": "dockerfile",
    "Makefile": "make",
    "Cargo.lock": "toml",
    "flake.lock": "json",
}
SHEBANGS: dict[str, str] = {
    "python": "python",
    "bash": "shell",
    "sh": "shell",
    "node": "javascript",
}
MAX_BYTES = 1_000_000  # larger files are generated or vendored; counting them skews the map


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the root, with '/' separators
    language: str | None
    size: int


class IgnoreRules:
    """The .gitignore files seen from the root down to one directory; the deepest match wins."""

    def __init__(self, layers: tuple[tuple[str, pathspec.PathSpec], ...] = ()) -> None:
        self.layers = layers

    def descend(self, root: Path, relative_dir: str) -> IgnoreRules:
        file = root / relative_dir / ".gitignore" if relative_dir else root / ".gitignore"
        if not file.is_file():
            return self
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        return IgnoreRules((*self.layers, (relative_dir, pathspec.GitIgnoreSpec.from_lines(lines))))

    def ignored(self, relative: str, is_dir: bool) -> bool:
        verdict = False
        for base, spec in self.layers:
            inside = relative[len(base) + 1 :] if base else relative
            result = spec.check_file(inside + "/" if is_dir else inside)
            if result.include is not None:
                verdict = result.include
        return verdict


def detect_language(path: Path) -> str | None:
    if path.name in NAMES:
        return NAMES[path.name]
    language = EXTENSIONS.get(path.suffix.lower())
    if language or path.suffix:
        return language
    try:
        with path.open("rb") as handle:
            first = handle.readline(200)
    except OSError:
        return None
    if first.startswith(b"#!"):
        words = first[2:].decode("ascii", "replace").replace("/", " ").split()
        for word in reversed(words):
            for prefix, language in SHEBANGS.items():
                if word.startswith(prefix):
                    return language
    return None


def is_binary(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return b"\0" in handle.read(8192)
    except OSError:
        return True


def walk(root: Path) -> list[SourceFile]:
    """Every non-ignored, non-binary file under root, sorted by path."""
    root = root.resolve()
    base_rules = IgnoreRules()
    exclude = root / ".git" / "info" / "exclude"
    if exclude.is_file():
        lines = exclude.read_text(encoding="utf-8", errors="replace").splitlines()
        base_rules = IgnoreRules((("", pathspec.GitIgnoreSpec.from_lines(lines)),))
    rules_by_dir = {"": base_rules.descend(root, "")}
    found: list[SourceFile] = []
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = Path(directory).relative_to(root).as_posix()
        relative_dir = "" if relative_dir == "." else relative_dir
        rules = rules_by_dir.pop(relative_dir)
        kept = []
        for name in sorted(dirnames):
            relative = f"{relative_dir}/{name}" if relative_dir else name
            if name == ".git" or rules.ignored(relative, is_dir=True):
                continue
            if (Path(directory) / name).is_symlink():  # do not follow links out of the tree
                continue
            kept.append(name)
            rules_by_dir[relative] = rules.descend(root, relative)
        dirnames[:] = kept
        for name in sorted(filenames):
            relative = f"{relative_dir}/{name}" if relative_dir else name
            path = Path(directory) / name
            if rules.ignored(relative, is_dir=False) or path.is_symlink() or not path.is_file():
                continue
            size = path.stat().st_size
            if size > MAX_BYTES or is_binary(path):
                continue
            found.append(SourceFile(relative, detect_language(path), size))
    return sorted(found, key=lambda f: f.path)
