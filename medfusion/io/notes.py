"""Free-text clinical notes: read safely, never shown.

A note is the most identifying thing medfusion touches (names, dates, places), so this
module reads it and hands back the text, and nothing here ever puts the text into a message,
a log line or a file name. Errors name the role only; callers add the study key or the
manifest line.

Rules (the same for a manifest cell, a ``<role>.txt`` file in a study folder and the Python
API):

* a note file larger than :data:`MAX_NOTE_BYTES` is refused (``NOTE_TOO_LARGE``) from its
  size on disk, before a byte of it is read;
* it must be UTF-8 (a byte-order mark is accepted and dropped); anything else is refused
  (``NOTE_ENCODING``), never guessed;
* an empty or blank note is a *missing* modality, like an empty image cell (the study is
  scored with what else it has; ``load_study`` records a ``NOTE_EMPTY`` finding with the
  role, and predictions carry the flag ``NOTE_EMPTY:<role>``).

:func:`count_tokens` counts the words and punctuation groups of a note with the
pre-tokenizer of the HuggingFace ``tokenizers`` library that the default text encoder uses
too (``medfusion inspect`` reports this number, never the text).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from medfusion.errors import NoteError
from medfusion.words import note_words

#: largest note file read (bytes); a discharge summary is a few kB, a long history < 100 kB
MAX_NOTE_BYTES = 1_000_000
#: suffix of a note file (a manifest cell ending in it names a file; ``<role>.txt``)
NOTE_SUFFIX = ".txt"
#: finding / flag code of a note that is present but empty
NOTE_EMPTY = "NOTE_EMPTY"


def decode_note(data: bytes, role: str) -> str | None:
    """UTF-8 bytes -> the note text, or None when it is empty or blank. ``NOTE_ENCODING``
    for bytes that are not UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NoteError(
            f"the `{role}` note is not UTF-8 text; save it as UTF-8 (the note is not shown).",
            code="NOTE_ENCODING") from None
    return text if text.strip() else None


def check_note_text(text: str, role: str, max_bytes: int = MAX_NOTE_BYTES) -> str | None:
    """A note given as text (an inline manifest cell, the Python API): the same size rule
    as a file; None when empty or blank."""
    if not isinstance(text, str):
        raise NoteError(f"the `{role}` note must be text (str), got {type(text).__name__}.")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise NoteError(
            f"the `{role}` note is larger than {max_bytes} bytes; shorten it (the note is not "
            "shown).", code="NOTE_TOO_LARGE")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise NoteError(f"the `{role}` note holds lone surrogates, not valid Unicode text.",
                        code="NOTE_ENCODING")
    return text if text.strip() else None


def read_note(path: str | os.PathLike[str], role: str, max_bytes: int = MAX_NOTE_BYTES
              ) -> str | None:
    """The text of the note file at ``path`` (None when empty or blank).

    The size is checked from the file system before anything is read (``NOTE_TOO_LARGE``);
    a file that is not UTF-8 is refused (``NOTE_ENCODING``); a path that is not a regular
    file is ``NOTE_UNREADABLE``. Messages name ``role`` only, never the path or the text."""
    try:
        st = os.stat(path)
    except OSError:
        raise NoteError(f"the `{role}` note file cannot be opened.") from None
    if not stat.S_ISREG(st.st_mode):
        raise NoteError(f"the `{role}` note is not a regular file.")
    if st.st_size > max_bytes:
        raise NoteError(
            f"the `{role}` note file is {st.st_size} bytes, over the {max_bytes}-byte note "
            "limit; shorten it (the note is not read).", code="NOTE_TOO_LARGE")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since stat
    except OSError:
        raise NoteError(f"the `{role}` note file cannot be read.") from None
    if len(data) > max_bytes:
        raise NoteError(f"the `{role}` note file is over the {max_bytes}-byte note limit.",
                        code="NOTE_TOO_LARGE")
    return decode_note(data, role)


def resolve_note(source: str | os.PathLike[str] | None, role: str) -> str | None:
    """A manifest note cell (``ManifestRow.notes[role]``) -> its text: inline text is
    checked as text, a ``Path`` is read with :func:`read_note`; None = missing."""
    if source is None:
        return None
    if isinstance(source, str):
        return check_note_text(source, role)
    return read_note(source, role)


def note_file(folder: str | os.PathLike[str], role: str) -> Path | None:
    """``<folder>/<role>.txt`` when it exists (the note of ``role`` in a study folder).
    A symbolic link is followed only while it stays inside the folder (``NOTE_UNREADABLE``
    otherwise, like every link that leaves a study folder)."""
    path = Path(folder) / f"{role}{NOTE_SUFFIX}"
    if not os.path.lexists(path):
        return None
    real, base = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, base]) != base:
        raise NoteError(f"the `{role}` note is a link that leaves the study folder; links "
                        "out of a study folder are not followed.")
    return path


def count_tokens(text: str | None) -> int:
    """Words and punctuation groups of ``text`` (:mod:`medfusion.words`: the units the
    default text encoder's vocabulary is made of)."""
    return len(note_words(text)) if text else 0
