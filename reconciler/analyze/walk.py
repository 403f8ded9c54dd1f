"""Walking a source tree the way git sees it: .gitignore files (nested ones too) are honoured,
binary, oversized and unreadable files are left out (each with its reason), each file gets a
language from its name."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

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
    ".rb": "ruby", ".kt": "kotlin", ".swift": "swift", ".cs": "csharp", ".php": "php",
    ".scala": "scala", ".lua": "lua", ".zig": "zig", ".hs": "haskell", ".ex": "elixir",
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


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]  # matched against the whole path relative to the .gitignore
    negate: bool
    dir_only: bool


def _glob(segment: str) -> str:
    """One path segment of a wildmatch pattern as a regex: * and ? stop at '/'."""
    out, i = "", 0
    while i < len(segment):
        char = segment[i]
        if char == "\\" and i + 1 < len(segment):
            out, i = out + re.escape(segment[i + 1]), i + 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = i + 1
            if end < len(segment) and segment[end] in "!^":
                end += 1
            if end < len(segment) and segment[end] == "]":
                end += 1
            end = segment.find("]", end)
            if end == -1:
                out += re.escape(char)
            else:
                body = segment[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = "".join(c if c == "-" else re.escape(c) for c in body)
                out += f"[{'^' if negate else ''}{body}]"
                i = end
        else:
            out += re.escape(char)
        i += 1
    return out


def parse_gitignore(lines: list[str]) -> tuple[IgnorePattern, ...]:
    """Patterns in file order, as gitignore(5) reads them."""
    patterns = []
    for raw in lines:
        line = re.sub(r"(?<!\\)\s+$", "", raw)  # trailing blanks count only when escaped
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line[1:] if negate else line
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        # A slash at the start or in the middle anchors the pattern to the .gitignore's
        # directory; otherwise it matches at any depth below it.
        anchored = "/" in line
        segments = line.removeprefix("/").split("/")
        regex = ""
        for index, segment in enumerate(segments):
            first, last = index == 0, index == len(segments) - 1
            if segment == "**":
                regex += ".*" if first and last else ".+" if last else "(?:.*/)?"
                continue
            regex += _glob(segment) + ("" if last else "/")
        if not anchored:
            regex = "(?:.*/)?" + regex
        patterns.append(IgnorePattern(re.compile(regex, re.DOTALL), negate, dir_only))
    return tuple(patterns)


class IgnoreRules:
    """The .gitignore files seen from the root down to one directory. As in git, the last
    matching pattern of a file decides, and a deeper file overrides a shallower one; a
    directory pattern (`build/`, `!*/`) speaks for directories only, never for the files in
    them (an ignored directory is not walked at all, so its files are never asked about)."""

    def __init__(self, layers: tuple[tuple[str, tuple[IgnorePattern, ...]], ...] = ()) -> None:
        self.layers = layers

    def descend(self, root: Path, relative_dir: str) -> IgnoreRules:
        file = root / relative_dir / ".gitignore" if relative_dir else root / ".gitignore"
        try:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:  # none, or a directory we cannot read: the walk reports the latter
            return self
        return IgnoreRules((*self.layers, (relative_dir, parse_gitignore(lines))))

    def ignored(self, relative: str, is_dir: bool) -> bool:
        verdict = False
        for base, patterns in self.layers:
            inside = relative[len(base) + 1 :] if base else relative
            for pattern in reversed(patterns):
                if (is_dir or not pattern.dir_only) and pattern.regex.fullmatch(inside):
                    verdict = not pattern.negate
                    break
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


@dataclass(frozen=True)
class LeftOut:
    """A file or directory the walk could not or would not read, and why: the report lists
    every one, so nothing vanishes silently."""

    path: str  # relative to the root; a directory ends with '/'
    reason: str
    language: str | None = None  # what its name says it would have been


@dataclass
class Tree:
    files: list[SourceFile]
    left_out: list[LeftOut]


def _why_not(error: OSError) -> str:
    return f"unreadable ({error.strerror or error})"


def _classify(path: Path, size: int) -> str | None:
    """Why a regular file is left out, or None when it is read."""
    if size > MAX_BYTES:
        return f"over {MAX_BYTES:,} bytes ({size:,})"
    try:
        with path.open("rb") as handle:
            head = handle.read(8192)
    except OSError as exc:
        return _why_not(exc)
    return "binary (contains NUL bytes)" if b"\0" in head else None


def walk_tree(root: Path) -> Tree:
    """Every non-ignored file under root that can be read, sorted by path, and every file or
    directory left out with the reason (unreadable, too large, binary, a symbolic link)."""
    root = root.resolve()
    base_rules = IgnoreRules()
    exclude = root / ".git" / "info" / "exclude"
    if exclude.is_file():
        lines = exclude.read_text(encoding="utf-8", errors="replace").splitlines()
        base_rules = IgnoreRules((("", parse_gitignore(lines)),))
    rules_by_dir = {"": base_rules.descend(root, "")}
    found: list[SourceFile] = []
    left_out: list[LeftOut] = []

    def unlisted(error: OSError) -> None:  # os.walk would skip it without a word
        relative = Path(error.filename).relative_to(root).as_posix()
        left_out.append(LeftOut(f"{relative}/" if relative != "." else "./", _why_not(error)))

    for directory, dirnames, filenames in os.walk(root, onerror=unlisted):
        relative_dir = Path(directory).relative_to(root).as_posix()
        relative_dir = "" if relative_dir == "." else relative_dir
        rules = rules_by_dir.pop(relative_dir)
        kept = []
        for name in sorted(dirnames):
            relative = f"{relative_dir}/{name}" if relative_dir else name
            if name == ".git" or rules.ignored(relative, is_dir=True):
                continue
            if (Path(directory) / name).is_symlink():  # do not follow links out of the tree
                left_out.append(LeftOut(relative + "/", "symbolic link (not followed)"))
                continue
            kept.append(name)
            rules_by_dir[relative] = rules.descend(root, relative)
        dirnames[:] = kept
        for name in sorted(filenames):
            relative = f"{relative_dir}/{name}" if relative_dir else name
            if rules.ignored(relative, is_dir=False):
                continue
            path = Path(directory) / name
            try:
                info = path.lstat()
            except OSError as exc:  # a directory we may list but not enter
                left_out.append(LeftOut(relative, _why_not(exc), detect_language(path)))
                continue
            reason: str | None
            if stat.S_ISLNK(info.st_mode):
                reason = "symbolic link (not followed)"
            elif not stat.S_ISREG(info.st_mode):
                continue  # sockets, FIFOs, devices: not source
            else:
                reason = _classify(path, info.st_size)
            if reason:
                left_out.append(LeftOut(relative, reason, detect_language(path)))
            else:
                found.append(SourceFile(relative, detect_language(path), info.st_size))
    return Tree(sorted(found, key=lambda f: f.path), sorted(left_out, key=lambda f: f.path))


def walk(root: Path) -> list[SourceFile]:
    """Every non-ignored, readable text file under root, sorted by path."""
    return walk_tree(root).files
