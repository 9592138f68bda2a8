"""Seeded mutation fuzzing of the NIfTI reader: every mutant either loads as a sound volume
(finite voxels, a finite non-singular affine, a non-empty 3D/4D shape) or is refused with a
specific :class:`~medfusion.errors.MedfusionError` code; never an untyped exception.

Seeds are the bundled sample MR NIfTI and small files written here with nibabel (3D and 4D,
plain and gzip, NIfTI-1 and NIfTI-2). Mutations work on the raw header bytes (dim, pixdim,
datatype, bitpix, vox_offset, scl_slope/inter, xyzt_units, qform/sform codes and values, quatern_*,
srow_*), on the data (byte flips, truncation) and on the gzip stream (truncation, flips).
"""

from __future__ import annotations

import collections
import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.errors import MedfusionError
from medfusion.io.nifti import load_nifti

REPO = Path(__file__).resolve().parents[1]
N_MUTANTS = 600
SEED = 20240611

# The header fields the fuzzer mutates: (name, nibabel field of the first value, number of
# values). Offsets and struct formats come from nibabel's header layouts, so one table
# serves NIfTI-1 and NIfTI-2 (64-bit dims and doubles).
_FIELDS = (("dim", "dim", 8), ("datatype", "datatype", 1), ("bitpix", "bitpix", 1),
           ("pixdim", "pixdim", 8), ("vox_offset", "vox_offset", 1),
           ("scl_slope", "scl_slope", 1), ("scl_inter", "scl_inter", 1),
           ("xyzt_units", "xyzt_units", 1), ("qform_code", "qform_code", 1),
           ("sform_code", "sform_code", 1), ("quatern", "quatern_b", 3),
           ("qoffset", "qoffset_x", 3), ("srow", "srow_x", 12))
_STRUCT_FORMAT = {"i2": "h", "i4": "i", "i8": "q", "u1": "B", "f4": "f", "f8": "d"}


def _field_layout(header: type[nib.Nifti1Header]) -> dict[str, tuple[int, str, int]]:
    """``{name: (byte offset, struct format, number of values)}`` in ``header``'s layout."""
    layout = header.template_dtype.fields
    return {name: (layout[first][1], _STRUCT_FORMAT[layout[first][0].base.str[1:]], count)
            for name, first, count in _FIELDS}


_N1_FIELDS = _field_layout(nib.Nifti1Header)
_N2_FIELDS = _field_layout(nib.Nifti2Header)
_SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.5, 1e-30, 1e30, 3.0e38, -3.0e38,
                   float("nan"), float("inf"), -float("inf")]
_SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 255, 256, 511, 768, 1024, 32767, -32768]
_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
              2304, 9999]


def _seeds(tmp: Path) -> list[tuple[str, bytes]]:
    """(name, raw uncompressed bytes) of every seed file."""
    rng = np.random.default_rng(SEED)
    seeds: list[tuple[str, bytes]] = []
    for sample in sorted(REPO.glob("data_samples/studies/*/mr.nii.gz"))[:1]:
        seeds.append(("sample-mr", gzip.decompress(sample.read_bytes())))
    aff = np.array([[0.0, -0.9, 0.1, 12.5], [0.95, 0.0, 0.0, -30.0],
                    [0.0, 0.05, 2.4, 7.0], [0.0, 0.0, 0.0, 1.0]])
    images = {
        "3d-int16": nib.Nifti1Image(rng.integers(-100, 900, (6, 5, 4)).astype(np.int16), aff),
        "4d-float32": nib.Nifti1Image(rng.normal(size=(4, 3, 3, 2)).astype(np.float32), aff),
        "3d-uint8-nifti2": nib.Nifti2Image(rng.integers(0, 255, (5, 4, 3)).astype(np.uint8),
                                           aff),
    }
    images["3d-int16"].set_qform(aff, code=1)  # both transforms set
    images["3d-int16"].header.set_slope_inter(0.5, -10.0)
    for name, img in images.items():
        path = tmp / f"{name}.nii"
        nib.save(img, str(path))
        seeds.append((name, path.read_bytes()))
    return seeds


def _mutate_field(raw: bytearray, rng: np.random.Generator) -> str:
    nifti2 = int.from_bytes(raw[:4], "little") == 540
    fields = _N2_FIELDS if nifti2 else _N1_FIELDS
    name = list(fields)[int(rng.integers(len(fields)))]
    offset, fmt, count = fields[name]
    index = int(rng.integers(count))
    where = offset + index * struct.calcsize(fmt)
    if name == "datatype":
        value: float = _DATATYPES[int(rng.integers(len(_DATATYPES)))]
    elif fmt in "fd":
        value = _SPECIAL_FLOATS[int(rng.integers(len(_SPECIAL_FLOATS)))]
        if rng.random() < 0.3:  # a perturbation of the real value
            (old,) = struct.unpack_from("<" + fmt, raw, where)
            value = float(old) * float(rng.choice([-1.0, 0.999, 1.5, 1e6]))
    else:
        value = _SPECIAL_INTS[int(rng.integers(len(_SPECIAL_INTS)))]
        if fmt == "B":
            value = int(value) % 256
        elif fmt == "q" and rng.random() < 0.3:
            value = int(rng.integers(-(2**40), 2**40))
    if fmt == "f" and np.isfinite(value) and abs(value) > 3.4e38:
        value = float("inf")
    struct.pack_into("<" + fmt, raw, where, value)
    return f"{name}[{index}]"


def _flip_bytes(raw: bytearray, rng: np.random.Generator, start: int) -> str:
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(start, len(raw)))
        raw[pos] = int(rng.integers(256))
    return "data flip" if start > 0 else "any flip"


def _truncate(raw: bytearray, rng: np.random.Generator) -> str:
    del raw[int(rng.integers(0, len(raw))):]
    return "truncate"


def _mutant(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    """One mutant: (file bytes, description, gzip-compressed)."""
    data = bytearray(raw)
    kind = float(rng.random())
    steps: list[str] = []
    if kind < 0.6:
        for _ in range(int(rng.integers(1, 4))):
            steps.append(_mutate_field(data, rng))
    elif kind < 0.75:
        steps.append(_flip_bytes(data, rng, 352))
    elif kind < 0.82:
        steps.append(_flip_bytes(data, rng, 0))
    else:
        steps.append(_truncate(data, rng))
    compressed = bool(rng.random() < 0.5)
    out = bytes(data)
    if compressed:
        out = gzip.compress(out, compresslevel=1, mtime=0)
        if rng.random() < 0.35:  # damage the gzip stream itself
            stream = bytearray(out)
            if rng.random() < 0.5:
                del stream[int(rng.integers(10, len(stream))):]
                steps.append("gzip cut")
            else:
                pos = int(rng.integers(10, len(stream)))
                stream[pos] ^= 1 + int(rng.integers(255))
                steps.append("gzip flip")
            out = bytes(stream)
    return out, "+".join(steps), compressed


def _check_sound(vol) -> None:  # noqa: ANN001 - a Volume
    assert vol.array.ndim in (3, 4) and vol.array.size > 0
    assert all(n > 0 for n in vol.array.shape)
    assert np.isfinite(vol.array).all()
    assert vol.affine.shape == (4, 4) and np.isfinite(vol.affine).all()
    det = float(np.linalg.det(vol.affine[:3, :3]))
    assert np.isfinite(det) and abs(det) > 1e-12
    assert np.isfinite(vol.spacing).all() and all(s > 0 for s in vol.spacing)


def test_mutants_load_soundly_or_fail_with_a_specific_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    seeds = _seeds(tmp_path)
    assert len(seeds) == 4, "the bundled sample MR NIfTI is missing"
    for name, raw in seeds:  # the seeds themselves load
        path = tmp_path / f"seed-{name}.nii"
        path.write_bytes(raw)
        _check_sound(load_nifti(path))
    outcomes: collections.Counter[str] = collections.Counter()
    untyped: list[str] = []
    for n in range(N_MUTANTS):
        name, raw = seeds[n % len(seeds)]
        data, how, compressed = _mutant(raw, rng)
        path = tmp_path / f"m{n:04d}{'.nii.gz' if compressed else '.nii'}"
        path.write_bytes(data)
        try:
            vol = load_nifti(path)
        except MedfusionError as error:
            # A specific code, never the base class's catch-all.
            assert error.code not in ("MEDFUSION_ERROR", "INTERNAL"), (name, how, error)
            assert path.name not in error.message
            outcomes[error.code] += 1
        except Exception as error:  # noqa: BLE001 - the outcome this test must never see
            untyped.append(f"{name} {how}: {type(error).__name__}: {error}")
            outcomes["UNTYPED"] += 1
        else:
            _check_sound(vol)
            outcomes["LOADED"] += 1
        path.unlink()
    print("NIfTI fuzz outcomes:", dict(sorted(outcomes.items())))
    assert not untyped, "\n".join(untyped[:20])
    # The mix is meaningful: both sound loads and several distinct refusals occurred.
    assert outcomes["LOADED"] >= 20
    assert len([c for c in outcomes if c != "LOADED"]) >= 5


@pytest.mark.parametrize("cut", [0, 10, 100, 347, 351])
def test_cut_inside_the_header(tmp_path: Path, cut: int) -> None:
    raw = _seeds(tmp_path)[1][1]
    for suffix, data in ((".nii", raw[:cut]), (".nii.gz", gzip.compress(raw[:cut]))):
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(data)
        with pytest.raises(MedfusionError) as err:
            load_nifti(path)
        assert err.value.code in ("TRUNCATED", "NOT_NIFTI", "CORRUPT"), err.value
