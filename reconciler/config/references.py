"""Files a desired state names (key files, local model paths), checked on this host.

Not part of the schema: the NixOS module validates the desired state at build time, in a
sandbox where secrets do not exist yet; `tensorforge validate` on the host runs these too,
so a missing keys file is found before the gateway fails on it at run time."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.config.schema import DesiredState


def named_files(state: DesiredState) -> list[tuple[str, str]]:
    """(field, path) of every file the state expects to exist."""
    found: list[tuple[str, str]] = []
    if state.gateway.enable and state.gateway.api_keys_file:
        found.append(("gateway.api_keys_file", state.gateway.api_keys_file))
    if state.monitoring.enable and state.monitoring.scrape_key_file:
        found.append(("monitoring.scrape_key_file", state.monitoring.scrape_key_file))
    for name, backend in state.backends.items():
        if backend.api_key_file:
            found.append((f"backends.{name}.api_key_file", backend.api_key_file))
    for name, model in state.models.items():
        scheme, _, rest = model.source.partition(":")
        if scheme == "path":
            found.append(
                (f"models.{name}.source", str(Path(rest) / model.file) if model.file else rest)
            )
    return found


def file_problems(state: DesiredState) -> list[str]:
    """One line per named file that is missing or unreadable: the field, the path, the fix."""
    problems = []
    for field, path in named_files(state):
        if not os.path.exists(path):
            problems.append(f"{field}: {path} does not exist; create it or fix the path")
        elif os.path.isdir(path) and not field.startswith("models."):
            problems.append(f"{field}: {path} is a directory; name the file itself")
        elif not os.access(path, os.R_OK):
            problems.append(f"{field}: {path} is not readable by this user; fix its permissions")
    return problems
