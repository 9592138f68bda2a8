"""``Volume.meta`` for DICOM: an allow-list of acquisition tags, each validated by kind
(numbers parse, code strings look like code strings, free text is scrubbed of the
header's own identifiers), plus pseudonymous series and study keys."""

from __future__ import annotations

import math
import re
from typing import Any

from pydicom.uid import (
    UID,
)

from medfusion.io.dicom.headers import META_ALLOW_LIST, SeriesInfo, _scrub
from medfusion.io.keys import pseudonym

_META_NUMERIC = frozenset({"MagneticFieldStrength", "SliceThickness", "SpacingBetweenSlices",
                           "KVP", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
                           "BitsStored"})


_META_FREE = frozenset({"Manufacturer", "ManufacturerModelName", "ConvolutionKernel"})


_CODE_STRING = re.compile(r"^[A-Z0-9 _]{0,16}$")


def _meta_value(tag: str, value: Any, ds: Any) -> Any:
    """An allow-listed value, validated by kind; None when it does not look like one.

    A malformed header can put anything in any tag (a name in KVP), so numbers must parse,
    code strings must be DICOM code strings, and the few free-text tags are scrubbed of the
    header's own identifiers.
    """
    values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
        else [value]
    out: list[Any] = []
    for v in values:
        if tag in _META_NUMERIC:
            try:
                f = float(v)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(f):
                return None
            out.append(f)
        elif tag in _META_FREE:
            out.append(_scrub(str(v), ds)[:64])
        else:
            text = str(v).strip()
            if not _CODE_STRING.match(text):
                return None
            out.append(text)
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def _meta(ds: Any, info: SeriesInfo | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for tag in META_ALLOW_LIST:
        try:
            value = ds.get(tag)
        except Exception:  # noqa: BLE001 - an unparsable value is simply left out
            continue
        if value is None or value == "":
            continue
        checked = _meta_value(tag, value, ds)
        if checked is not None:
            meta[tag] = checked
    if info is not None:
        meta["series_key"] = info.key
        meta["study_key"] = info.study_key
        meta["n_files"] = info.n_instances
    else:
        meta["series_key"] = pseudonym(str(ds.get("SeriesInstanceUID", "")), prefix="se-")
        meta["study_key"] = pseudonym(str(ds.get("StudyInstanceUID", "")), prefix="st-")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        meta["TransferSyntax"] = UID(str(ts)).name
    return meta
