"""NIfTI-1 / NIfTI-2 single-file images (``.nii``, ``.nii.gz``) to a validated :class:`Volume`.

Reader contract:

* **Format is sniffed, not guessed from the name**: gzip is recognised by its magic
  bytes, so a ``.nii.gz`` that is not compressed and a ``.nii`` that is both load;
  :func:`sniff_format` tells NIfTI from DICOM by their magic strings, never by the first
  four bytes (a DICOM preamble may start with the bytes of 348).
* **The header is checked before any pixel buffer exists**: dimensions must be
  positive, the rank at most 4 once trailing singleton axes are dropped, the data type a
  plain integer or float, and the declared size within :func:`check_declared_size`'s cap.
  An uncompressed file shorter than its header declares is refused from its size alone.
* **Decompression is capped at the header-implied size**: the stream is read in chunks
  up to exactly the declared bytes, so a small header over a huge stream cannot exhaust
  memory; more data than declared is reported (``TRAILING_DATA``), refused when strict.
* **The whole stream is decompressed and checked at load time**: a ``.nii.gz`` cut or
  corrupted at its tail fails here with ``TRUNCATED`` / ``CORRUPT`` (CRC and length are
  verified), never later inside a model.
* **Affine policy**: the sform when ``sform_code > 0``, else the qform when
  ``qform_code > 0``, else nibabel's pixdim-only base affine (``NO_SPATIAL_TRANSFORM``,
  refused when strict). When both codes are set and the two disagree the sform wins and a
  ``QFORM_SFORM_MISMATCH`` finding records the largest difference.
* **Header values readers disagree on** (see :func:`_qform`, :func:`_scaling`): qfac 0 is
  read as 1 like nibabel; a qform-only image with a negative voxel size, a qfac below 0
  other than -1 or a quaternion that is no rotation is refused (``GEOMETRY``), and only
  reported (``QFORM_INVALID``) when an sform defines the grid; a slope of 0 or not finite
  means no scaling (``SCALING_IGNORED`` when an intercept was set); a usable slope with a
  non-finite intercept is refused (``INVALID_VALUES``). An absurd affine (an entry beyond
  10 km, an infinite determinant) is refused (``GEOMETRY``).
* **Sheared affines** are kept exactly and reported (``SHEARED_AFFINE``); strict refuses.
* **4D** comes back as (I, J, K, T); 5D+ with more than one element beyond the fourth
  axis is refused (``UNSUPPORTED_DIMENSIONS``). A 2D image comes back as (I, J, 1).
* **NaN / Inf** voxels after scaling are refused (``INVALID_VALUES``).

Free-text header fields (``descrip``, ``aux_file``, ``db_name``) and extensions may hold
patient data: they are never copied into ``meta``; ``descrip``/``intent_name`` are only
scanned for a modality word (CT, MR, ...).
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    MedfusionError,
    NoImagesError,
    TruncatedError,
    UnsupportedInputError,
)
from medfusion.io.limits import check_declared_size
from medfusion.io.walk import link_loop_error
from medfusion.keys import pseudonym
from medfusion.stages import timed
from medfusion.types import Finding, Volume

__all__ = ["is_nifti_name", "load_nifti", "sniff_format", "sniff_gzip"]

_GZIP_MAGIC = b"\x1f\x8b"
_DICOM_MAGIC = b"DICM"  # at byte 128, after the free-form preamble
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")  # at byte 344
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")  # at byte 4
_CHUNK = 16 * 1024 * 1024
# Extensions live between the header and vox_offset; anything beyond this is a broken header.
_MAX_VOX_OFFSET = 64 * 1024 * 1024
# qform is stored as float32 quaternions: allow their rounding, flag real disagreement.
_QS_RTOL, _QS_ATOL_MM = 1e-4, 1e-3
# No scanner grid has a voxel or an origin 10 km away; beyond it the header is corrupt.
_MAX_COORD_MM = 1e7
_SHEAR_TOL = 1e-4  # |cos| between axis directions beyond which the grid is sheared
_MODALITY_WORDS = (
    (re.compile(r"\bCT\b", re.I), "CT"),
    (re.compile(r"\bMRI?\b", re.I), "MR"),
    (re.compile(r"\bPET?\b", re.I), "PT"),
    (re.compile(r"\b(DX|CR|X-?RAY|RADIOGRAPH)\b", re.I), "DX"),
)


def is_nifti_name(path: str | Path) -> bool:
    """Whether a file name says NIfTI (``.nii`` or ``.nii.gz``, any case)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def sniff_gzip(path: str | Path) -> bool:
    """True when the file starts with the gzip magic bytes (whatever its extension says)."""
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _has_nifti_magic(head: bytes) -> bool:
    return head[344:348] in _NIFTI1_MAGICS or head[4:8] in _NIFTI2_MAGICS


def sniff_format(path: str | Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"unknown"``, from the file's bytes, not its name.

    The magic strings decide: ``DICM`` at byte 128 (DICOM Part 10) and ``n+1``/``ni1`` at
    byte 344 or ``n+2``/``ni2`` at byte 4 (NIfTI-1/-2; a gzip stream is looked into). The
    first four bytes (NIfTI's ``sizeof_hdr``) are not used: a DICOM preamble is free-form
    and may start with the bytes of 348. When both magics are present (a contrived file)
    the NIfTI one wins only if ``sizeof_hdr`` agrees with it. Unreadable files are
    ``"unknown"``; the loaders then report why.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(548)
            if head[:2] == _GZIP_MAGIC:
                fh.seek(0)
                with _open_stream(Path(path), True) as stream:
                    head = stream.read(548)
    except Exception:  # noqa: BLE001 - a damaged gzip stream or unreadable file: undecided
        return "unknown"
    dicom = head[128:132] == _DICOM_MAGIC
    if _has_nifti_magic(head):
        sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
        if not dicom or sizes & {348, 540}:
            return "nifti"
    return "dicom" if dicom else "unknown"


def _open_stream(path: Path, compressed: bool) -> BinaryIO:
    if not compressed:
        return open(path, "rb")
    try:  # isal's gunzip is about twice as fast as zlib's (design notes).
        from isal import igzip

        return igzip.open(path, "rb")  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - isal is a core dependency
        import gzip

        return gzip.open(path, "rb")  # type: ignore[return-value]


def _read_up_to(stream: BinaryIO, n: int, into: bytearray) -> None:
    """Append at most ``n`` bytes from ``stream`` to ``into`` in bounded chunks, so memory
    grows only with data that really exists (never a blind allocation of ``n``)."""
    remaining = n
    while remaining > 0:
        chunk = stream.read(min(_CHUNK, remaining))
        if not chunk:
            return
        into.extend(chunk)
        remaining -= len(chunk)


def _stream_error(exc: BaseException, what: str) -> MedfusionError:
    """Map a decompression failure to a typed error (EOF: truncated; CRC/length: corrupt)."""
    if isinstance(exc, EOFError):
        return TruncatedError(
            f"{what}: the gzip stream ends early (the file was cut, e.g. an interrupted copy "
            "or download). Copy or export the file again."
        )
    return CorruptFileError(
        f"{what}: the gzip stream is corrupt ({type(exc).__name__}: failed integrity check). "
        "Copy or export the file again."
    )


def _parse_header(head: bytes, what: str) -> Any:
    """nibabel's NIfTI-1 or NIfTI-2 header from the first bytes, endianness detected."""
    import nibabel as nib

    if len(head) < 348:
        raise TruncatedError(f"{what}: the file ends inside the NIfTI header. Export it again.")
    n1 = int.from_bytes(head[:4], "little")
    n1_be = int.from_bytes(head[:4], "big")
    if 348 in (n1, n1_be):
        klass: Any = nib.Nifti1Header
        size = 348
    elif 540 in (n1, n1_be):
        klass = nib.Nifti2Header
        size = 540
        if len(head) < 540:
            raise TruncatedError(f"{what}: the file ends inside the NIfTI-2 header.")
    else:
        raise UnsupportedInputError(
            f"{what} is not a NIfTI file (no NIfTI header). Give a .nii/.nii.gz image, a DICOM "
            "file or a DICOM series folder.",
            code="NOT_NIFTI",
        )
    try:
        header = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
    except Exception as exc:  # nibabel raises several types for garbage headers
        raise CorruptFileError(f"{what}: unreadable NIfTI header ({type(exc).__name__}).") from exc
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise UnsupportedInputError(
            f"{what} is a NIfTI .hdr/.img pair header; convert it to a single .nii file "
            "(e.g. nibabel.save(nibabel.load('x.hdr'), 'x.nii')).",
        )
    if magic not in (b"n+1", b"n+2"):
        raise UnsupportedInputError(
            f"{what} has no NIfTI magic (an Analyze 7.5 file?); convert it to NIfTI.",
            code="NOT_NIFTI",
        )
    return header


def _declared_shape(header: Any, what: str) -> tuple[int, ...]:
    """The data shape after checking rank and signs, trailing singleton axes dropped."""
    dim = [int(d) for d in np.asarray(header["dim"]).tolist()]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise CorruptFileError(
            f"{what}: header dim[0] = {ndim} is not a rank 1..7 (byte-swapped or corrupt "
            "header). Export the image again."
        )
    shape = dim[1 : 1 + ndim]
    if any(d <= 0 for d in shape):
        raise CorruptFileError(
            f"{what}: header declares a non-positive dimension {tuple(shape)}; the header is "
            "corrupt. Export the image again."
        )
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise UnsupportedInputError(
            f"{what}: a {len(shape)}D image {tuple(shape)} (e.g. vector or multi-echo "
            "components) is not supported; split it into 3D or 4D (x, y, z, t) files.",
            code="UNSUPPORTED_DIMENSIONS",
        )
    if len(shape) == 1:
        raise UnsupportedInputError(
            f"{what}: a 1D NIfTI is not an image; give a 2D, 3D or 4D file.",
            code="UNSUPPORTED_DIMENSIONS",
        )
    while len(shape) < 3:
        shape.append(1)
    return tuple(shape)


def _data_dtype(header: Any, what: str) -> np.dtype:
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:
        raise CorruptFileError(f"{what}: unknown NIfTI datatype code.") from exc
    if dtype.fields is not None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise UnsupportedInputError(
            f"{what}: data type {dtype} (complex, RGB or structured) is not supported; "
            "store one scalar channel per file (integer or float).",
            code="UNSUPPORTED_DATATYPE",
        )
    return dtype


def _qform(header: Any) -> tuple[np.ndarray | None, str]:
    """The qform affine, or ``None`` and why it cannot be trusted.

    Rules where readers differ or refuse: ``pixdim[0]`` (qfac) 0, NaN or positive is 1 (as
    nibabel and niftilib both read it; real files carry 0), -1 is -1, any other negative
    value is refused (nibabel reads 1, niftilib -1). A negative voxel size is refused:
    nibabel takes its absolute value while ITK flips that axis, so the orientation is
    ambiguous. A quaternion with b^2 + c^2 + d^2 > 1 is not a rotation (nibabel refuses it,
    niftilib renormalises it to a different one): refused.
    """
    pixdim = np.asarray(header["pixdim"], dtype=np.float64)
    qfac = float(pixdim[0])
    if qfac < 0 and qfac != -1.0:
        return None, f"pixdim[0] (qfac) is {qfac:g}, neither 1 nor -1"
    if np.any(pixdim[1:4] < 0):
        return None, "a voxel size (pixdim[1..3]) is negative"
    fixed = header.copy()
    fixed["pixdim"][0] = -1.0 if qfac == -1.0 else 1.0
    try:
        with np.errstate(all="ignore"):
            affine = np.asarray(fixed.get_qform(), dtype=np.float64)
    except ValueError:  # nibabel: w2 < 0, i.e. b^2 + c^2 + d^2 > 1 (HeaderDataError too)
        return None, "the qform quaternion is not a rotation (b^2 + c^2 + d^2 > 1)"
    return affine, ""


def _choose_affine(
    header: Any, what: str, strict: bool
) -> tuple[np.ndarray, str, list[Finding]]:
    """Apply the qform/sform policy of the module docstring; return affine, source, findings."""
    findings: list[Finding] = []
    sform_code = int(header["sform_code"])
    qform_code = int(header["qform_code"])
    qform, qform_problem = _qform(header) if qform_code > 0 else (None, "")
    with np.errstate(all="ignore"):
        sform = np.asarray(header.get_sform(), dtype=np.float64) if sform_code > 0 else None
    if sform is not None:
        affine, source = sform, "sform"
        if qform_problem:
            findings.append(
                Finding(
                    "QFORM_INVALID",
                    f"the qform is unusable ({qform_problem}); the sform (sform_code > 0) "
                    "was used, as the NIfTI standard and nibabel do.",
                    {"qform_code": qform_code, "sform_code": sform_code},
                )
            )
        elif qform is not None and not np.allclose(
            qform, sform, rtol=_QS_RTOL, atol=_QS_ATOL_MM
        ):
            with np.errstate(all="ignore"):
                diff = float(np.nanmax(np.abs(qform - sform)))
            findings.append(
                Finding(
                    "QFORM_SFORM_MISMATCH",
                    "qform and sform disagree; the sform (sform_code > 0) was used, as the "
                    "NIfTI standard and nibabel do. Check which one your pipeline wrote.",
                    {"max_abs_difference": round(diff, 6), "qform_code": qform_code,
                     "sform_code": sform_code},
                )
            )
    elif qform_problem:
        raise GeometryError(
            f"{what}: {qform_problem}, so the qform (the only transform, sform_code 0) does "
            "not define an orientation that readers agree on. Re-export the image with "
            "valid geometry."
        )
    elif qform is not None:
        affine, source = qform, "qform"
    else:
        if strict:
            raise GeometryError(
                f"{what}: qform_code and sform_code are both 0, so the orientation is "
                "unknown. Re-export the image with its scanner geometry.",
                code="NO_SPATIAL_TRANSFORM",
            )
        with np.errstate(all="ignore"):
            affine, source = header.get_base_affine(), "base"
        findings.append(
            Finding(
                "NO_SPATIAL_TRANSFORM",
                "qform_code and sform_code are both 0: orientation unknown, a pixdim-only "
                "affine was used. Do not combine this image with others in world space.",
            )
        )
    affine = np.asarray(affine, dtype=np.float64)
    rot = affine[:3, :3]
    with np.errstate(all="ignore"):
        det = float(np.linalg.det(rot)) if np.all(np.isfinite(affine)) else math.nan
    # An infinite determinant (voxel sizes near float32's maximum) is no usable grid either.
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise GeometryError(
            f"{what}: the {source} affine is singular or not finite (a zero voxel size?). "
            "Re-export the image with valid geometry."
        )
    if float(np.max(np.abs(affine))) > _MAX_COORD_MM:
        # Finite but absurd (a corrupt double in a NIfTI-2 header): spacing would overflow.
        raise GeometryError(
            f"{what}: the {source} affine holds a voxel size or position beyond "
            f"{_MAX_COORD_MM:g} mm; the header is corrupt. Re-export the image with valid "
            "geometry."
        )
    norms = np.linalg.norm(rot, axis=0)
    cosines = (rot / norms).T @ (rot / norms)
    shear = float(np.max(np.abs(cosines - np.eye(3))))
    if shear > _SHEAR_TOL:
        if strict:
            raise GeometryError(
                f"{what}: the affine is sheared (voxel axes not orthogonal); strict mode "
                "refuses it. Resample it to an orthogonal grid, or load without strict.",
                code="SHEARED_AFFINE",
            )
        findings.append(
            Finding(
                "SHEARED_AFFINE",
                "the affine is sheared (voxel axes not orthogonal, e.g. a gantry tilt kept as "
                "stacked); kept exactly, spacing is the length of each axis.",
                {"max_axis_cosine": round(shear, 6)},
            )
        )
    return affine, source, findings


def _scaling(header: Any, what: str) -> tuple[float, float, list[Finding]]:
    """``scl_slope``/``scl_inter`` by nibabel's rule: a slope of 0 or not finite means no
    scaling (both ignored); a finite non-zero slope with a non-finite intercept is refused
    (nibabel refuses it too, ITK silently drops the intercept)."""
    slope = float(header["scl_slope"])
    inter = float(header["scl_inter"])
    if slope == 0.0 or not math.isfinite(slope):
        findings = []
        if inter != 0.0 and not math.isnan(inter):
            # ITK applies such an intercept on its own: say which reading was used.
            findings.append(
                Finding(
                    "SCALING_IGNORED",
                    "scl_slope is 0 or not finite, so scl_slope and scl_inter were both "
                    "ignored (the NIfTI and nibabel rule); other readers may add the "
                    "intercept. Check the intensities.",
                )
            )
        return 1.0, 0.0, findings
    if not math.isfinite(inter):
        raise InvalidValuesError(
            f"{what}: scl_slope is set but scl_inter is NaN or infinite, so no intensity "
            "is defined. Fix the header's scaling (e.g. scl_inter = 0) and save again."
        )
    return slope, inter, []


def _time_unit(header: Any) -> str:
    try:
        return str(header.get_xyzt_units()[1])
    except KeyError:  # a unit code NIfTI does not define: informative only, not refused
        return "unknown"


def _modality(header: Any) -> str:
    text = " ".join(
        bytes(header[field]).split(b"\x00")[0].decode("latin-1", "replace")
        for field in ("descrip", "intent_name")
    )
    for pattern, modality in _MODALITY_WORDS:
        if pattern.search(text):
            return modality
    return "unknown"


def _read_checked(
    stream: BinaryIO, n: int, into: bytearray, what: str, compressed: bool
) -> None:
    """:func:`_read_up_to` with every stream failure mapped to a typed error."""
    try:
        _read_up_to(stream, n, into)
    except OSError as exc:
        if not compressed:
            raise _unreadable(what, exc) from exc
        raise _stream_error(exc, what) from exc  # gzip's BadGzipFile is an OSError
    except Exception as exc:
        if not compressed:
            raise
        # A damaged deflate stream raises the decompressor's own type (zlib.error,
        # isal's IsalError, EOFError...), none of them a shared base below Exception.
        raise _stream_error(exc, what) from exc


def _unreadable(what: str, exc: BaseException) -> MedfusionError:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return link_loop_error(what)
    return UnsupportedInputError(
        f"{what} cannot be read ({type(exc).__name__}); check its permissions.",
        code="UNREADABLE",
    )


def _vox_offset(header: Any, what: str) -> int:
    value = float(header["vox_offset"])
    hdr_size = int(header["sizeof_hdr"])
    # NaN and inf fail this comparison too, before any int() conversion.
    if not hdr_size <= value <= _MAX_VOX_OFFSET:
        raise CorruptFileError(
            f"{what}: implausible vox_offset {value:g} (before the end of the header, past "
            f"{_MAX_VOX_OFFSET} bytes or not a number); the header is corrupt. Export the "
            "image again."
        )
    return int(value)


def load_nifti(path: str | Path, *, strict: bool = False) -> Volume:
    """Load a ``.nii`` / ``.nii.gz`` file as a float32 :class:`Volume` in RAS+ mm.

    See the module docstring for what is checked, reported (``issues``) and refused. Raises
    only :class:`~medfusion.errors.MedfusionError` subclasses on bad input; messages name the
    file by a pseudonym, never by its (possibly identifying) name.
    """
    p = Path(path)
    what = f"NIfTI file {pseudonym(str(p.absolute()), prefix='file-')}"
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unreadable(what, exc) from exc
        raise NoImagesError(f"{what} does not exist or is not a file; check the path.") from exc
    if not stat.S_ISREG(st.st_mode):
        raise NoImagesError(f"{what} does not exist or is not a file; check the path.")
    findings: list[Finding] = []
    buf = bytearray()
    try:
        compressed = sniff_gzip(p)
        with _open_stream(p, compressed) as stream:
            _read_checked(stream, 540, buf, what, compressed)
            header = _parse_header(bytes(buf), what)
            shape = _declared_shape(header, what)
            dtype = _data_dtype(header, what)
            check_declared_size(shape, dtype.itemsize, what)
            offset = _vox_offset(header, what)
            need = offset + math.prod(shape) * dtype.itemsize
            if not compressed and st.st_size < need:
                raise TruncatedError(
                    f"{what}: the header declares {need} bytes but the file has "
                    f"{st.st_size} (cut short, or dims byte-swapped). Export it again."
                )
            if len(buf) > need:
                del buf[need:]
            with timed("decode"):  # the voxel bytes (gunzipped here for .nii.gz)
                _read_checked(stream, need - len(buf), buf, what, compressed)
            if len(buf) < need:
                raise TruncatedError(
                    f"{what}: the data ends after {len(buf)} of {need} declared bytes. "
                    "Copy or export the file again."
                )
            # Reading one byte more verifies the gzip CRC and length at the end of the
            # stream (tail corruption) without decompressing past the cap.
            extra = bytearray()
            if compressed:
                _read_checked(stream, 1, extra, what, compressed)
    except OSError as exc:  # opening the file (permissions, a link loop, ...)
        raise _unreadable(what, exc) from exc
    if extra:
        if strict:
            raise CorruptFileError(
                f"{what}: the gzip stream holds more data than the header declares; strict "
                "mode refuses it. Re-export the image."
            )
        findings.append(
            Finding(
                "TRAILING_DATA",
                "the gzip stream holds more data than the header declares; only the declared "
                "image was read (the rest was not decompressed).",
            )
        )

    affine, source, geo_findings = _choose_affine(header, what, strict)
    findings.extend(geo_findings)
    slope, inter, scale_findings = _scaling(header, what)
    findings.extend(scale_findings)
    raw = np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset, order="F")
    with np.errstate(all="ignore"):
        # Keep NIfTI's Fortran order: a C-order copy would cost a slow transposing pass
        # (measured 2.2 s vs 0.25 s for 512x512x200); Volume does not require C order.
        array = np.array(raw, dtype=np.float32, order="K")
        if slope != 1.0:
            array *= np.float32(slope)
        if inter != 0.0:
            array += np.float32(inter)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InvalidValuesError(
            f"{what}: {bad} voxel(s) are NaN or infinite after scaling. Fill or mask them "
            "(e.g. numpy.nan_to_num) and save again; medfusion never passes NaN to a model."
        )

    pixdim = np.asarray(header["pixdim"], dtype=np.float64)
    meta: dict[str, Any] = {
        "format": "NIfTI-2" if int(header["sizeof_hdr"]) == 540 else "NIfTI-1",
        "compressed": bool(compressed),
        "stored_dtype": str(dtype.newbyteorder("=")),
        "affine_source": source,
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    if len(shape) == 4:
        step = float(pixdim[4])
        meta["n_timepoints"] = int(shape[3])
        meta["time_step"] = step if math.isfinite(step) else None  # JSON has no NaN
        meta["time_unit"] = _time_unit(header)
    return Volume(
        array=array,
        affine=affine,
        modality=_modality(header),
        meta=meta,
        issues=tuple(findings),
    )
