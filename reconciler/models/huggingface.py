"""HuggingFace Hub source (`hf:ORG/REPO`), through the real `huggingface_hub` client.

The revision is resolved to a commit once and every file is fetched at that commit, so a pull
is reproducible and the registry records exactly what was downloaded. Files download into a
hidden staging directory (huggingface_hub resumes its `.incomplete` files there after an
interruption), are checked against the hub's LFS sha256 (and the declared one), and only then
renamed into `<models>/<name>/`: a partial or unverified file is never where a backend looks.

Honours HF_ENDPOINT (tests point it at a local server), HF_TOKEN, and huggingface_hub's own
HF_HUB_DISABLE_PROGRESS_BARS."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reconciler.config.schema import ModelSpec
from reconciler.models.files import (
    PullError,
    contained_path,
    ensure_space,
    open_dir,
    replace_in,
    sha256_file,
)

log = logging.getLogger(__name__)
ATTEMPTS = 3  # whole-file attempts; huggingface_hub also resumes within one attempt
STAGING = ".hf-staging"


@dataclass(frozen=True)
class HubFile:
    name: str  # path inside the repository
    size: int | None
    sha256: str | None  # the LFS object id; None for small git-stored files


@dataclass(frozen=True)
class HubPull:
    commit: str
    paths: list[Path]  # in name order; the first is what a backend loads
    digests: dict[str, str]  # path -> sha256, verified


def select_files(files: list[HubFile], spec: ModelSpec, repo: str) -> list[HubFile]:
    """The files a spec asks for: `file` exactly, every match of `pattern`, or the one GGUF."""
    names = sorted(f.name for f in files)
    if spec.file:
        chosen = [f for f in files if f.name == spec.file]
        what = f"file {spec.file!r}"
    elif spec.pattern:
        chosen = [f for f in files if fnmatch.fnmatch(f.name, spec.pattern)]
        what = f"pattern {spec.pattern!r}"
    else:
        chosen = [f for f in files if f.name.endswith(".gguf")]
        what = "no file or pattern (expecting exactly one .gguf)"
        if len(chosen) > 1:
            raise PullError(
                f"hf:{repo} has {len(chosen)} GGUF files; choose with file: or pattern: "
                f"(for example '*Q4_K_M.gguf'): {', '.join(f.name for f in chosen[:8])}"
            )
    if not chosen:
        raise PullError(
            f"hf:{repo}: {what} matches nothing; the repository has: {', '.join(names[:20])}"
        )
    return sorted(chosen, key=lambda f: f.name)


def list_repo(
    repo: str, revision: str, endpoint: str | None, token: str | None
) -> tuple[str, list[HubFile]]:
    """(commit, files) of a repository at a revision, with sizes and LFS checksums."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, files_metadata=True
        )
    except RevisionNotFoundError:
        raise PullError(
            f"hf:{repo}: revision {revision!r} does not exist; fix models.*.revision"
        ) from None
    except RepositoryNotFoundError:
        raise PullError(
            f"hf:{repo}: repository not found (or private: set HF_TOKEN to a token that can read it)"
        ) from None
    except HfHubHTTPError as exc:
        raise PullError(f"hf:{repo}: the hub answered {exc}") from None
    files = [
        HubFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    ]
    if not info.sha:
        raise PullError(f"hf:{repo}: the hub did not say which commit {revision!r} is")
    return info.sha, files


def fetch_hf(
    name: str,
    repo: str,
    spec: ModelSpec,
    models_dir: Path,
    recorded: dict[str, str] | None = None,
) -> HubPull:
    """`recorded`: path -> sha256 of the files the registry holds for this model (verified when
    they were pulled), so that one still matching the hub's listing is not hashed again."""
    from huggingface_hub import hf_hub_download

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None  # per call
    token = os.environ.get("HF_TOKEN") or None
    commit, listing = list_repo(repo, spec.revision or "main", endpoint, token)
    wanted = select_files(listing, spec, repo)
    if spec.sha256 and len(wanted) != 1:
        raise PullError(f"models.{name}.sha256 names one file but {len(wanted)} files match")
    target_dir = contained_path(models_dir, name)
    # Inside the model's own directory: a hostile listing ("../other/x.gguf") must not reach
    # a sibling model either; checked before anything is downloaded.
    finals = {f.name: contained_path(target_dir, *PurePosixPath(f.name).parts) for f in wanted}
    digests: dict[str, str] = {}
    for f in wanted:
        if (digest := _present(finals[f.name], f, recorded or {})) is not None:
            digests[str(finals[f.name])] = digest
    missing = [f for f in wanted if str(finals[f.name]) not in digests]
    ensure_space(models_dir, sum(f.size or 0 for f in missing))
    staging = _staging(models_dir, name)
    for f in missing:
        final = finals[f.name]
        staged = _download(hf_hub_download, repo, f.name, commit, staging, endpoint, token)
        digest = sha256_file(staged)
        problem = None
        if f.sha256 and digest != f.sha256:
            problem = f"expected {f.sha256} (the hub's LFS checksum): the download is corrupt"
        elif spec.sha256 and digest != spec.sha256:
            problem = f"declared {spec.sha256}: the file differs from the declaration"
        if problem:
            staged.unlink()
            raise PullError(
                f"hf:{repo}/{f.name}@{commit[:12]}: sha256 is {digest}, {problem}; "
                "the file was discarded (pull again, or fix models.*.sha256)"
            )
        *folders, file_name = PurePosixPath(f.name).parts
        with open_dir(models_dir, name, *folders) as directory, open_dir(staged.parent) as source:
            replace_in(source, staged.name, directory, file_name)
        digests[str(final)] = digest
        log.info("hf:%s/%s verified and stored as %s", repo, f.name, final)
    shutil.rmtree(staging, ignore_errors=True)
    with open_dir(models_dir, name):
        pass  # the model's folder exists (a real directory) even when nothing was missing
    return HubPull(commit, [finals[f.name] for f in wanted], digests)


def _staging(models_dir: Path, name: str) -> Path:
    """The model's staging folder, a real directory (opened without following symlinks), with
    any symlink planted inside removed: huggingface_hub opens paths there itself."""
    with open_dir(models_dir, STAGING, name):
        pass
    staging = models_dir / STAGING / name
    for directory, folders, files in os.walk(staging):
        for entry in folders + files:
            if os.path.islink(os.path.join(directory, entry)):
                os.unlink(os.path.join(directory, entry))
    return staging


def _present(final: Path, hub_file: HubFile, recorded: dict[str, str]) -> str | None:
    """The sha256 of the file already at `final` when it is the one the listing names, else None
    (download it). Same size is not enough: another revision's file of the same size (new
    weights, same shape) would pass for the new one, with the listing's checksum on stale bytes."""
    if not final.is_file() or hub_file.size is None or final.stat().st_size != hub_file.size:
        return None
    if hub_file.sha256 is None:
        return None  # a small git-stored file: no checksum to compare with, fetching is cheap
    if recorded.get(str(final)) == hub_file.sha256:
        return hub_file.sha256  # registered after verification with this very checksum
    digest = sha256_file(final)  # left by a pull that was never registered, or a stale revision
    return digest if digest == hub_file.sha256 else None


def _download(hf_hub_download, repo, filename, commit, staging, endpoint, token) -> Path:
    last: Exception | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return Path(
                hf_hub_download(
                    repo,
                    filename,
                    revision=commit,
                    local_dir=staging,
                    endpoint=endpoint,
                    token=token,
                )
            )
        except Exception as exc:  # network or hub errors: the .incomplete file stays for resume
            last = exc
        log.warning("hf:%s/%s attempt %d/%d failed: %s", repo, filename, attempt, ATTEMPTS, last)
    raise PullError(
        f"hf:{repo}/{filename}: download failed after {ATTEMPTS} attempts ({last}); "
        "run the pull again to resume"
    )
