"""Write a file so that readers see the old content or the new one, never half of either.

A writer killed between creating its temporary file and renaming it (SIGKILL, power loss)
leaves that file behind. Its name carries the writer's pid, so the next writer can sweep the
orphans of dead writers without touching a live writer's file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def atomic_output(path: Path, mode: int = 0o644, newline: str | None = None) -> Iterator[TextIO]:
    """A text handle on a temporary file next to `path`, renamed over `path` when the block
    ends without an exception and removed when it raises: a reader (or the input being
    exported into its own file) sees the old content until the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        # Name the file the caller meant, not the temporary one (or none, for a failed write).
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash only once the directory is synced
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    with atomic_output(path, mode) as handle:
        handle.write(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_orphans(directory: Path, prefix: str = "") -> list[Path]:
    """Remove temporary files left by writers that died mid-write; return what was removed.

    `prefix` narrows the sweep in shared directories (/etc/systemd/system) to our own names.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(f".{prefix}*.tmp"):
        # .NAME.PID.RANDOM.tmp; NAME itself may contain dots, so read the pid from the right.
        parts = tmp.name[1:].removesuffix(".tmp").rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue  # not ours
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # gone already, or a read-only directory: the next writer retries
    return removed
