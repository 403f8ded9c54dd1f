"""Optional dependencies, grouped as the package's extras (pyproject.toml): a feature imports
its dependency through `require`, so a missing one is an error naming the extra to install
instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> {import name: distribution}; tests/test_extras.py keeps this and pyproject.toml equal
EXTRAS: dict[str, dict[str, str]] = {
    "analyze": {"tree_sitter_language_pack": "tree-sitter-language-pack", "openai": "openai"},
    "postgres": {"psycopg": "psycopg"},
    "cpu": {"xllamacpp": "xllamacpp"},
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(self, extra: str, purpose: str, module: str) -> None:
        super().__init__(
            f"{purpose} needs {EXTRAS[extra][module]}, which is not installed: "
            f"install tensorforge[{extra}] (pip install 'tensorforge[{extra}]')",
            name=module,
        )
        self.extra = extra


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, one of `extra`'s, for `purpose` (e.g. "tensorforge analyze")."""
    if module not in EXTRAS[extra]:
        raise ValueError(
            f"{module} is not in the extra {extra!r}: add it to EXTRAS and pyproject.toml"
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name != module and not exc.name.startswith(module + "."):
            raise  # the module is there but one of its own dependencies is broken: show that
        raise MissingExtra(extra, purpose, module) from exc


def require_extra(extra: str, purpose: str) -> None:
    """Every module of `extra`, imported now: before the work, not halfway through it."""
    for module in EXTRAS[extra]:
        require(module, extra, purpose)
