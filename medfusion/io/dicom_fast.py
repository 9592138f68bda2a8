"""A minimal header walker for the common case: a Part 10 file, little-endian (explicit or
implicit VR), not deflated. It reads only the tags medfusion asks for, skips every other
element by its length (vendor private blocks included) and stops at the pixel data, so
a 200-file series is parsed several times faster than with pydicom's full reader.

Anything unusual (big endian, deflate, a sequence we need, an odd character set, a parse
error) returns None and the caller falls back to pydicom. Values come back already
converted (numbers as int/float, strings stripped, multi-values as lists), in an object
with the small part of the ``pydicom.Dataset`` interface medfusion uses (``get``, ``in``,
``file_meta``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_PIXEL_TAG = 0x7FE00010
_OK_CHARSETS = {"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 192"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_NUMERIC = {b"US": "<H", b"SS": "<h", b"UL": "<I", b"SL": "<i", b"FL": "<f", b"FD": "<d"}


class _Unsupported(Exception):
    """Raised inside the walker: the caller uses pydicom instead."""


class FastHeader:
    """Converted values of the requested tags, by keyword (``Dataset``-like access)."""

    __slots__ = ("_values", "file_meta")

    def __init__(self, values: dict[str, Any], file_meta: dict[str, Any]) -> None:
        self._values = values
        self.file_meta = file_meta

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_"):  # never recurse (e.g. while copying or unpickling)
            raise AttributeError(keyword)
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


def _convert(vr: bytes, raw: bytes, encoding: str) -> Any:
    if vr in _NUMERIC:
        fmt = _NUMERIC[vr]
        size = struct.calcsize(fmt)
        n = len(raw) // size
        vals = struct.unpack("<" + fmt[1] * n, raw[: n * size])
        return vals[0] if n == 1 else list(vals)
    if vr in (b"OB", b"OW", b"UN", b"OD", b"OF", b"OL", b"SQ", b"AT"):
        raise _Unsupported  # binary/sequence values are never needed from the fast path
    text = raw.decode(encoding, errors="replace").rstrip("\x00 ").lstrip(" ")
    if vr in (b"LT", b"ST", b"UT"):
        return text
    parts = [p.strip(" \x00") for p in text.split("\\")]
    if vr == b"DS":
        vals: list[Any] = [float(p) for p in parts if p != ""]
    elif vr == b"IS":
        vals = [int(float(p)) for p in parts if p != ""]
    else:
        vals = parts
    if not vals:
        return ""
    return vals[0] if len(vals) == 1 else vals


class _Walker:
    def __init__(self, buf: bytes, wanted: dict[int, str], refuse: set[int]) -> None:
        self.buf = buf
        self.wanted = wanted
        self.refuse = refuse

    def skip_undefined(self, pos: int, explicit: bool) -> int:
        """Skip an undefined-length sequence value starting at ``pos``; return the position
        after its delimiter."""
        buf = self.buf
        while True:
            if pos + 8 > len(buf):
                raise _Unsupported
            tag = (int.from_bytes(buf[pos : pos + 2], "little") << 16) | int.from_bytes(
                buf[pos + 2 : pos + 4], "little"
            )
            length = int.from_bytes(buf[pos + 4 : pos + 8], "little")
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise _Unsupported
            if length == _UNDEFINED:
                pos = self.walk(pos, explicit, {}, "latin-1", until_item_end=True)
            else:
                pos += length

    def walk(
        self,
        pos: int,
        explicit: bool,
        out: dict[str, Any],
        encoding: str,
        *,
        until_item_end: bool = False,
        stop_group: int | None = None,
    ) -> int:
        buf = self.buf
        n = len(buf)
        while pos + 8 <= n:
            group = int.from_bytes(buf[pos : pos + 2], "little")
            if stop_group is not None and group != stop_group:
                return pos
            tag = (group << 16) | int.from_bytes(buf[pos + 2 : pos + 4], "little")
            if tag == _ITEM_END and until_item_end:
                return pos + 8
            if tag == _PIXEL_TAG and not until_item_end:
                return pos
            if tag in self.refuse and not until_item_end:
                raise _Unsupported
            if explicit and group != 0xFFFE:
                vr = buf[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    if pos + 12 > n:
                        raise _Unsupported
                    length = int.from_bytes(buf[pos + 8 : pos + 12], "little")
                    pos += 12
                else:
                    if not vr.isalpha():
                        raise _Unsupported
                    length = int.from_bytes(buf[pos + 6 : pos + 8], "little")
                    pos += 8
            else:
                length = int.from_bytes(buf[pos + 4 : pos + 8], "little")
                pos += 8
                vr = b""
            if length == _UNDEFINED:
                if tag >> 16 == 0x7FE0:
                    raise _Unsupported
                # an undefined-length UN holds implicit-VR content (PS3.5 6.2.2)
                pos = self.skip_undefined(pos, explicit and vr != b"UN")
                continue
            if pos + length > n:
                raise _Unsupported  # header longer than the chunk read, or truncated
            keyword = None if until_item_end else self.wanted.get(tag)
            if keyword is not None:
                if not vr:
                    vr_name = dictionary_VR(tag)
                    vr = vr_name.split(" ")[0].encode()
                raw = buf[pos : pos + length]
                out[keyword] = _convert(vr, raw, encoding)
                if keyword == "SpecificCharacterSet":
                    charset = out[keyword] if isinstance(out[keyword], str) else "multi"
                    if charset not in _OK_CHARSETS:
                        raise _Unsupported
                    encoding = "utf-8" if charset == "ISO_IR 192" else "latin-1"
            pos += length
        if until_item_end:
            raise _Unsupported
        return pos


def wanted_tags(keywords: Iterable[str]) -> dict[int, str]:
    """Map tag numbers to keywords for the walker."""
    out: dict[int, str] = {}
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is not None:
            out[int(tag)] = kw
    return out


def read_fast_header(
    path: str, wanted: dict[int, str], refuse: set[int], chunk: int = 65536
) -> tuple[FastHeader, int | None, str] | None:
    """Parse a Part 10 file's header. Returns (header, pixel tag offset or None, transfer
    syntax) or None when the fast path does not apply (the caller uses pydicom)."""
    with open(path, "rb") as fp:
        buf = fp.read(chunk)
        complete = len(buf) < chunk
        if len(buf) < 132 or buf[128:132] != b"DICM":
            return None
        while True:
            try:
                result = _parse(buf, wanted, refuse)
                need_more = result is not None and result[1] is None
            except _Unsupported:
                result, need_more = None, True
            except (ValueError, UnicodeDecodeError, struct.error, IndexError):
                return None
            if not need_more or complete:
                return result
            buf += fp.read()  # header longer than the first chunk: read the rest once
            complete = True


def _parse(
    buf: bytes, wanted: dict[int, str], refuse: set[int]
) -> tuple[FastHeader, int | None, str] | None:
    walker = _Walker(buf, wanted, refuse)
    meta_out: dict[str, Any] = {}
    meta_wanted = {0x00020010: "TransferSyntaxUID", 0x00020002: "MediaStorageSOPClassUID"}
    meta_walker = _Walker(buf, meta_wanted, set())
    pos = meta_walker.walk(132, True, meta_out, "latin-1", stop_group=0x0002)
    ts = str(meta_out.get("TransferSyntaxUID", "")).strip("\x00 ")
    if ts == _EXPLICIT_LE:
        explicit = True
    elif ts == _IMPLICIT_LE:
        explicit = False
    elif ts.startswith("1.2.840.10008.1.2.4.") or ts == "1.2.840.10008.1.2.5":
        explicit = True  # encapsulated syntaxes are explicit VR little endian
    else:
        return None  # big endian, deflate, unknown
    values: dict[str, Any] = {}
    end = walker.walk(pos, explicit, values, "latin-1")
    is_pixel = end + 4 <= len(buf) and int.from_bytes(buf[end : end + 2], "little") == 0x7FE0
    pixel_offset = end if is_pixel else None
    return FastHeader(values, {"TransferSyntaxUID": ts}), pixel_offset, ts
