"""Atomic file output: readers see either the old file or the whole new one, never a part.

Every writer in medfusion (model packages, scores, reports, saliency maps, caches) goes
through here, so a run killed at any moment leaves no half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from medfusion.errors import OutputError


def ensure_output_dir(path: str | os.PathLike[str], *, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or raise ``OutputError`` (code ``OUTPUT_UNWRITABLE``)
    with a fix-it message, before any work is done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the {what} ({error.strerror}); choose a writable --out",
            code="OUTPUT_UNWRITABLE",
        ) from None
    if not out.is_dir():
        raise OutputError("--out exists and is not a folder", code="OUTPUT_UNWRITABLE")
    return out


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a rename in ``path`` (best effort: not every platform opens directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask. Read from /proc where the kernel lists it: setting it and putting
    it back (the only portable way) opens a moment in which a file another thread creates
    gets 0o022 instead of the user's mask (say 0o077 on a folder of patient data)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes, so libraries that pick a format
    from the name, like nibabel, still work); on success it is fsync'ed and renamed onto
    ``path``; on any error it is removed and the error propagates."""
    target = Path(path)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; the output should be as readable as any file the user
        # creates (0666 less the umask), e.g. by their group on a shared project folder.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing whose result appears at ``path`` only when the block succeeds."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", newline="") as handle:
        handle.write(text)
