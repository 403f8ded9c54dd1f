"""Parsers for the languages whose imports `analyze` follows, keyed by the walker's names."""

from __future__ import annotations

from reconciler.analyze.languages import nix, python, rust, typescript
from reconciler.analyze.languages.base import Language

LANGUAGES: dict[str, Language] = {
    "python": python.LANGUAGE,
    "rust": rust.LANGUAGE,
    "nix": nix.LANGUAGE,
    "typescript": typescript.LANGUAGE,
    "javascript": typescript.LANGUAGE,  # one grammar family, one resolver
}
