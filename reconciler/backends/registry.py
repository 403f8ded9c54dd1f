"""The backend kinds TensorForge knows, by the name the desired state's `kind:` gives. Every
site that depends on the kind (the schema's enum and settings checks, launch lines, probes,
unit templates, the gateway's adapters, memory estimates, scrape jobs, dashboards, the NixOS
module's kind list via modules/lib/kinds.json) reads this table: a new kind is its module in
reconciler/backends/kinds/, its templates/<kind>.service.j2 and one line here."""

from __future__ import annotations

import importlib

from reconciler.backends.kinds.base import Kind


def _load(name: str) -> Kind:
    """reconciler/backends/kinds/<name>.py's KIND, which must carry its module's name."""
    kind = getattr(importlib.import_module(f"reconciler.backends.kinds.{name}"), "KIND", None)
    if not isinstance(kind, Kind) or kind.name != name:
        raise TypeError(
            f"reconciler/backends/kinds/{name}.py must define KIND = Kind(name={name!r}, ...)"
        )
    return kind


# One line per kind: its module in reconciler/backends/kinds/ (and its templates/<name>.service.j2).
KINDS: dict[str, Kind] = {
    name: _load(name)
    for name in (
        "llamacpp",
        "vllm",
        "tgi",
        "ollama",
        "sglang",
    )
}

# A remote server that speaks OpenAI's API as it is: a wire protocol, not a kind (nothing runs it).
GENERIC_PROTOCOL = "openai"
PROTOCOLS: tuple[str, ...] = (*KINDS, GENERIC_PROTOCOL)
# The keys only some kinds use: each kind's settings model says which of them it takes.
KIND_SETTINGS: frozenset[str] = frozenset().union(*(k.settings_fields() for k in KINDS.values()))


def kind_of(name: str) -> Kind:
    """The kind named `name` (the schema has checked it is one)."""
    return KINDS[name]


def kinds_using(setting: str) -> list[str]:
    return [k.name for k in KINDS.values() if setting in k.settings_fields()]


def nix_kinds() -> dict[str, dict[str, object]]:
    """What the NixOS module needs of each kind, as modules/lib/kinds.json holds it (a test
    keeps the file in sync; regenerate with `python -m reconciler.backends.registry`)."""
    return {
        k.name: {
            "shards": k.shards,
            "metrics_path": k.metrics.path if k.metrics else None,
        }
        for k in KINDS.values()
    }


if __name__ == "__main__":
    import json
    import sys

    sys.stdout.write(json.dumps(nix_kinds(), indent=2, sort_keys=True) + "\n")
