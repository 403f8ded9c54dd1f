"""Model files on disk: the checks every source shares (containment, space, checksums) and
writes that never follow a symlink.

A pull runs as root and the models folder may be writable by others (a shared group, a
service user): a symlink planted at `<models>/<name>/<file>.partial` must not turn the pull
into "write 100 MB, as root, wherever it points". So below the models folder every directory
is opened with O_NOFOLLOW|O_DIRECTORY, one component at a time from the folder's own fd, and
every file is created inside such a directory fd with O_NOFOLLOW|O_EXCL (openat-style). The
models folder itself may be a symlink (a user's choice, resolved once)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PullError(Exception):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def contained_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that resolves outside root."""
    candidate = root.joinpath(*parts).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise PullError(f"{'/'.join(parts)!r} escapes the models directory {root}")
    return candidate


def inside(root: Path, path: str | Path) -> bool:
    """`path`, with every symlink resolved, lies inside `root` (resolved too)."""
    return Path(path).resolve().is_relative_to(root.resolve())


def ensure_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:  # checked before downloading, so a pull never fills the disk
        raise PullError(
            f"not enough disk space in {directory}: need {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free space or set TF_MODELS elsewhere"
        )


@contextmanager
def open_dir(root: Path, *parts: str) -> Iterator[int]:
    """A directory fd for root/parts..., creating missing directories (0755), with no symlink
    followed below `root`: a planted one fails with a PullError naming it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.resolve(), _DIR_FLAGS)
    try:
        for i, part in enumerate(parts):
            if part in ("", ".", "..") or "/" in part:
                raise PullError(f"{'/'.join(parts)!r} escapes the models directory {root}")
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = root.joinpath(*parts[: i + 1])
                    raise PullError(
                        f"{where} is a symlink or not a directory; a pull never writes through "
                        "one: remove it and pull again"
                    ) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def create_new(dir_fd: int, name: str) -> BinaryIO:
    """`name` inside the directory `dir_fd`, created afresh for writing: whatever was there
    (a stale partial file, a planted symlink) is unlinked, never followed or reused."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise PullError(f"{name} is a directory where a model file goes: remove it") from None
    fd = os.open(name, _NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
    return os.fdopen(fd, "wb")


def unlink_in(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def replace_in(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """rename(2) between directory fds: replaces a symlink at `dst` itself, never its target."""
    os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
