"""Compressed series decoded across processes: the same voxels and the same typed errors as
serial decoding; serial inside daemon processes (scoring workers) and when asked."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medfusion.errors import MedfusionError
from medfusion.io.dicom import parallel, pixels
from medfusion.io.volume import load_volume
from medfusion.stages import collect
from medfusion.testing.dicom_factory import truncate_file, write_series


def _ct(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(-1000, 2000, (48, 40, n)).astype(np.float64)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_parallel_decode_gives_the_serial_voxels(tmp_path: Path, syntax: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    arr = _ct(parallel.MIN_FILES + 2)
    write_series(tmp_path / "raw", arr, seed=4)
    write_series(tmp_path / "enc", arr, seed=4, transfer_syntax=syntax)
    raw = load_volume(tmp_path / "raw")
    monkeypatch.setenv(parallel.ENV, "2")
    calls: list[int] = []
    original = parallel.decode_parallel

    def spy(headers, what, *, strict):  # noqa: ANN001, ANN202 - records, then the real one
        result = original(headers, what, strict=strict)
        calls.append(-1 if result is None else len(result))
        return result

    monkeypatch.setattr("medfusion.io.dicom.series.decode_parallel", spy)
    with collect() as seconds:
        enc = load_volume(tmp_path / "enc")
    assert calls == [parallel.MIN_FILES + 2]  # really decoded by the pool
    assert seconds["decode"] > 0
    np.testing.assert_array_equal(enc.array, raw.array)
    np.testing.assert_array_equal(enc.affine, raw.affine)


def test_a_corrupt_frame_gives_the_serial_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_series(tmp_path, _ct(parallel.MIN_FILES), seed=5,
                         transfer_syntax=JPEG2000Lossless)
    truncate_file(paths[3], remove_bytes=400)
    codes = []
    for processes in ("1", "2"):
        monkeypatch.setenv(parallel.ENV, processes)
        with pytest.raises(MedfusionError) as err:
            load_volume(tmp_path)
        codes.append((err.value.code, err.value.message))
    assert codes[0] == codes[1]


def test_who_decodes_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(parallel.ENV, raising=False)
    assert parallel.decode_processes() == 1  # library default: opt in
    monkeypatch.setenv(parallel.ENV, "1")
    assert parallel.decode_processes() == 1
    monkeypatch.setenv(parallel.ENV, "3")
    assert parallel.decode_processes() == 3
    monkeypatch.setenv(parallel.ENV, "auto")
    assert 1 <= parallel.decode_processes() <= 8
    monkeypatch.setattr(mp.current_process(), "daemon", True, raising=False)
    assert parallel.decode_processes() == 1  # a scoring worker: the batch uses the cores
    assert RLELossless not in parallel.GIL_BOUND  # fast, and releases the GIL


def test_jpeg_ls_is_decoded_by_charls_with_the_voxels_libjpeg_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CharLS is the faster decoder; it must give exactly what pydicom's own choice gives.
    assert pixels._preferred_plugin(JPEGLSLossless) == "pyjpegls"
    assert pixels._preferred_plugin(JPEG2000Lossless) == ""
    arr = _ct(3)
    write_series(tmp_path / "enc", arr, seed=6, transfer_syntax=JPEGLSLossless)
    monkeypatch.setenv(parallel.ENV, "1")
    charls = load_volume(tmp_path / "enc")
    monkeypatch.setattr(pixels, "_PREFERRED_PLUGIN", {})
    default = load_volume(tmp_path / "enc")
    np.testing.assert_array_equal(charls.array, default.array)
