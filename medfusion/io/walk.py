"""The one folder walker: every file entry below a folder, with what it is.

Study discovery (:func:`medfusion.io.study.discover_study_files`), DICOM series folders
(:func:`medfusion.io.dicom.iter_files`) and batch discovery
(:func:`medfusion.scoring.discovery.walk_safe`) all walk with :func:`walk_files`, so a link
loop, a link leaving the allowed root or a dangling link is treated the same way everywhere.

Rules: entries are visited in sorted name order, a folder's files before its sub-folders (as
``os.walk`` does, so orders and digests are reproducible); every real folder is visited once
(a second link to it, or a link back up the tree, is not followed again); a symbolic link
resolving outside ``root`` is reported and never opened.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from medfusion.errors import UnsupportedInputError

__all__ = ["LINK_OUTSIDE", "NOT_REGULAR", "OK", "SYMLINK_LOOP", "is_within", "link_loop_error",
           "walk_files"]

OK = "OK"
LINK_OUTSIDE = "LINK_OUTSIDE"  # a link resolving outside the root: never opened
SYMLINK_LOOP = "SYMLINK_LOOP"  # a link that resolves back to itself
NOT_REGULAR = "NOT_REGULAR"  # a dangling link, a socket, an unreadable folder...


def link_loop_error(what: str) -> UnsupportedInputError:
    """The one ``SYMLINK_LOOP`` refusal: ``what`` (e.g. "the study folder") is a symbolic
    link that resolves to itself, so following it would never end."""
    return UnsupportedInputError(
        f"{what} is a symbolic link that points back to itself (a link loop); remove or fix "
        "the link.",
        code=SYMLINK_LOOP,
    )


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` (resolved, links followed) lies inside ``root`` (resolved)."""
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    try:
        return os.path.commonpath([real, real_root]) == real_root
    except ValueError:  # different drives on Windows
        return False


def walk_files(folder: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
               *, skip_hidden_dirs: bool = False) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, status)`` for every non-folder entry below ``folder``.

    ``status`` is :data:`OK` (a regular file, possibly through a link inside ``root``),
    :data:`LINK_OUTSIDE`, :data:`SYMLINK_LOOP` or :data:`NOT_REGULAR` (also yielded for a
    sub-folder that cannot be listed). ``root`` (default ``folder``) bounds where links may
    lead. Paths are as found under ``folder`` (links not resolved): never print them, they
    may hold names. ``skip_hidden_dirs`` does not descend into folders named ``.*``.
    """
    base = Path(folder)
    real_root = os.path.realpath(root if root is not None else folder)
    seen = {os.path.realpath(base)}
    yield from _walk(base, real_root, seen, skip_hidden_dirs)


def _walk(current: Path, real_root: str, seen: set[str], skip_hidden_dirs: bool
          ) -> Iterator[tuple[Path, str]]:
    try:
        entries = sorted(os.scandir(current), key=lambda e: e.name)
    except OSError:
        yield current, NOT_REGULAR
        return
    folders: list[Path] = []
    for entry in entries:
        path = Path(entry.path)
        is_link = entry.is_symlink()
        if is_link and not is_within(path, real_root):
            yield path, LINK_OUTSIDE
            continue
        try:
            # One stat, links followed: a loop (ELOOP) or a dangling link fails here instead
            # of inside DirEntry.is_dir()/is_file(), which raise on a loop.
            mode = os.stat(path).st_mode
        except OSError as exc:
            yield path, SYMLINK_LOOP if exc.errno == errno.ELOOP else NOT_REGULAR
            continue
        if stat.S_ISDIR(mode):
            real = os.path.realpath(path)
            if real not in seen and not (skip_hidden_dirs and entry.name.startswith(".")):
                seen.add(real)
                folders.append(path)
        elif stat.S_ISREG(mode):
            yield path, OK
        else:
            yield path, NOT_REGULAR
    for sub in folders:
        yield from _walk(sub, real_root, seen, skip_hidden_dirs)
