"""Series geometry (reliability cases B1-B9, A7, C1-C3) on DICOM written by the factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion.errors import (
    GeometryError,
    InvalidValuesError,
    MissingSlicesError,
    MixedSeriesError,
    NoImagesError,
)
from medfusion.io.dicom import iter_files, scan_dicom
from medfusion.io.volume import load_volume
from medfusion.testing.dicom_factory import series_affine, write_series

RNG = np.random.default_rng(1234)


def _random_ct(shape: tuple[int, ...] = (12, 10, 8)) -> np.ndarray:
    return RNG.integers(-1000, 1500, shape).astype(np.float64)


def _world(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World (RAS) coordinates of every voxel: (I, J, K, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _linear_field(xyz: np.ndarray) -> np.ndarray:
    """A smooth field in world mm: linear interpolation reproduces it exactly."""
    return 2.0 * xyz[..., 0] - 1.5 * xyz[..., 1] + 3.0 * xyz[..., 2]


# --- B4: order, names, instance numbers, oblique -----------------------------------------
@pytest.mark.parametrize("instance_numbers", ["normal", "reversed", "missing", "duplicate"])
def test_order_independent_of_files_and_instance_numbers(tmp_path: Path, instance_numbers):
    arr = _random_ct()
    write_series(tmp_path, arr, instance_numbers=instance_numbers, seed=7, file_names="instance")
    vol = load_volume(tmp_path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, series_affine(arr.shape), atol=1e-4)


def test_oblique_series_geometry_matches_written_affine(tmp_path: Path):
    arr = _random_ct()
    rot = _rotation(np.deg2rad(25), np.deg2rad(-35))
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 2.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    write_series(tmp_path, arr, affine=affine, seed=3)
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    assert vol.spacing == pytest.approx((0.7, 0.9, 2.0), abs=1e-5)
    info = scan_dicom(iter_files(tmp_path)).series[0]
    assert info.orientation == "oblique"


def _rotation(a: float, b: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


def test_world_space_agrees_with_simpleitk(tmp_path: Path):
    """Write with pydicom, read with SimpleITK and medfusion: same voxel at same point."""
    arr = _random_ct((9, 7, 5))
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.2, 0.1) @ np.diag([-0.8, -0.6, 1.5])
    affine[:3, 3] = (5.0, 7.0, -9.0)
    write_series(tmp_path, arr, affine=affine, seed=11)
    vol = load_volume(tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    img = reader.Execute()
    for ijk in [(0, 0, 0), (8, 6, 4), (3, 2, 1), (5, 0, 3)]:
        ras = vol.affine @ np.array([*ijk, 1.0])
        lps = (-ras[0], -ras[1], ras[2])
        sitk_idx = img.TransformPhysicalPointToIndex(lps)
        assert float(img[sitk_idx]) == pytest.approx(float(vol.array[ijk]))


def test_nested_folders_and_any_names(tmp_path: Path):
    arr = _random_ct((8, 8, 6))
    paths = write_series(tmp_path / "a", arr, seed=2)
    for n, p in enumerate(paths[:3]):
        dest = tmp_path / "a" / f"sub{n}" / "deeper" / p.name
        dest.parent.mkdir(parents=True)
        p.rename(dest)
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, arr)


# --- B3 jitter ---------------------------------------------------------------------------
def test_float_jitter_is_not_uneven(tmp_path: Path):
    arr = _random_ct((8, 8, 10))
    positions = np.arange(10) * 2.5 + RNG.normal(0, 2e-4, 10)
    write_series(tmp_path, arr, slice_positions=positions, seed=5)
    vol = load_volume(tmp_path, strict=True)
    assert vol.issues == ()
    assert vol.spacing[2] == pytest.approx(2.5, abs=1e-3)
    np.testing.assert_array_equal(vol.array, arr)


def test_two_decimal_positions_thin_slices_not_uneven(tmp_path: Path):
    arr = _random_ct((8, 8, 12))
    positions = np.round(np.arange(12) * 0.625, 2)  # gaps 0.62 / 0.63
    write_series(tmp_path, arr, slice_positions=positions, spacing=(0.7, 0.7, 0.625), seed=5)
    vol = load_volume(tmp_path, strict=True)
    assert vol.issues == ()
    np.testing.assert_array_equal(vol.array, arr)


# --- B2 missing slice --------------------------------------------------------------------
def test_missing_slice_reported_interpolated_and_strict_refuses(tmp_path: Path):
    arr = _random_ct((8, 8, 10))
    write_series(tmp_path, arr, missing_indices=(4,), seed=9)
    vol = load_volume(tmp_path)
    codes = [f.code for f in vol.issues]
    assert "MISSING_SLICES" in codes
    assert any("SPACING" in c for c in codes)
    missing = next(f for f in vol.issues if f.code == "MISSING_SLICES")
    assert missing.details["positions_mm"] == [pytest.approx(10.0, abs=1e-3)]
    # spacing kept at the true 2.5 mm (not averaged across the gap), 10 slices, gap filled
    assert vol.shape == (8, 8, 10)
    assert vol.spacing[2] == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_array_equal(vol.array[..., 3], arr[..., 3])
    np.testing.assert_allclose(vol.array[..., 4], (arr[..., 3] + arr[..., 5]) / 2, atol=1e-3)
    with pytest.raises(MissingSlicesError) as err:
        load_volume(tmp_path, strict=True)
    assert err.value.code == "MISSING_SLICES"


# --- uneven spacing ----------------------------------------------------------------------
def test_uneven_spacing_resampled_in_world_space(tmp_path: Path):
    shape = (10, 9, 7)
    positions = np.array([0.0, 2.0, 4.0, 7.0, 10.0, 11.0, 12.0])
    base = series_affine(shape, spacing=(1.0, 1.0, 1.0))
    world = _world(base, shape)
    world[..., 2] = base[2, 3] + positions[None, None, :]
    values = _linear_field(world)
    write_series(tmp_path, values, slice_positions=positions, spacing=(1.0, 1.0, 1.0),
                 rescale=(0.01, 0.0), seed=4)
    vol = load_volume(tmp_path)
    assert "UNEVEN_SPACING_RESAMPLED" in [f.code for f in vol.issues]
    assert vol.spacing[2] == pytest.approx(1.0, abs=1e-6)  # smallest gap (dcm2niix rule)
    expected = _linear_field(_world(vol.affine, vol.spatial_shape))
    np.testing.assert_allclose(vol.array, expected, atol=0.02)
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path, strict=True)
    assert err.value.code == "UNEVEN_SPACING"


# --- B6 gantry tilt ----------------------------------------------------------------------
def test_gantry_tilt_resampled_exactly_in_world_space(tmp_path: Path):
    shape = (16, 14, 8)
    sheared = series_affine(shape, spacing=(1.0, 1.0, 2.0), tilt_deg=20.0)
    values = _linear_field(_world(sheared, shape))
    write_series(tmp_path, values, spacing=(1.0, 1.0, 2.0), tilt_deg=20.0,
                 rescale=(0.01, 0.0), seed=8)
    vol = load_volume(tmp_path)
    tilt = next(f for f in vol.issues if "TILT" in f.code)
    assert tilt.code == "GANTRY_TILT_RESAMPLED"
    assert tilt.details["tilt_deg"] == pytest.approx(20.0, abs=0.01)
    # output grid is orthogonal: no shear left in the affine
    m = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)
    # every output voxel whose world point lies inside the source stack (1-voxel margin
    # in-plane, as neighbouring slices shift by < 1 voxel) equals the field there
    world = _world(vol.affine, vol.spatial_shape)
    src = (world - sheared[:3, 3]) @ np.linalg.inv(sheared[:3, :3]).T
    inside = (
        (src[..., 0] >= 1) & (src[..., 0] <= shape[0] - 2)
        & (src[..., 1] >= 1) & (src[..., 1] <= shape[1] - 2)
        & (src[..., 2] >= 0) & (src[..., 2] <= shape[2] - 1)
    )
    assert inside.sum() > 0.4 * inside.size
    np.testing.assert_allclose(vol.array[inside], _linear_field(world)[inside], atol=0.02)
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path, strict=True)
    assert err.value.code == "GANTRY_TILT"


# --- B5 duplicates and time points -------------------------------------------------------
def test_identical_duplicates_dropped(tmp_path: Path):
    arr = _random_ct((8, 8, 5))
    write_series(tmp_path / "x", arr, seed=1)
    paths = write_series(tmp_path / "y", arr, seed=1, file_names="index")
    for p in paths[:2]:  # same SOP content again under another name
        p.rename(tmp_path / "x" / ("copy_" + p.name))
    vol = load_volume(tmp_path / "x")
    np.testing.assert_array_equal(vol.array, arr)
    dup = next(f for f in vol.issues if f.code == "DUPLICATE_SLICES_REMOVED")
    assert dup.details["count"] == 2


def test_time_points_become_4d_never_interleaved(tmp_path: Path):
    arr = RNG.integers(0, 500, (8, 8, 4, 3)).astype(np.float64)
    write_series(tmp_path, arr, modality="MR", rescale=(1.0, 0.0), seed=6)
    vol = load_volume(tmp_path)
    assert vol.shape == (8, 8, 4, 3)
    np.testing.assert_array_equal(vol.array, arr)
    assert "MULTIPLE_TIME_POINTS" in [f.code for f in vol.issues]


def test_inseparable_duplicates_refused(tmp_path: Path):
    arr = RNG.integers(0, 500, (8, 8, 4, 2)).astype(np.float64)
    write_series(tmp_path, arr, modality="MR", rescale=(1.0, 0.0), time_tags=(),
                 instance_numbers="duplicate", seed=6)
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path)
    assert err.value.code == "DUPLICATE_POSITIONS"


# --- B7 / A7 -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags",
    [{"PixelSpacing": ["0.5", "0.5"]}, {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}],
)
def test_inconsistent_geometry_refused(tmp_path: Path, tags):
    arr = _random_ct((8, 8, 4))
    write_series(tmp_path, arr, per_slice_tags={2: tags}, seed=2)
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path)
    assert err.value.code == "INCONSISTENT_GEOMETRY"


def test_different_matrix_size_refused(tmp_path: Path):
    a = _random_ct((8, 8, 3))
    b = _random_ct((10, 8, 3))
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_series(tmp_path, a, series_uid=uid, seed=1)
    write_series(tmp_path, b, series_uid=uid, seed=2, slice_positions=[10.0, 12.5, 15.0])
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path)
    assert err.value.code == "INCONSISTENT_GEOMETRY"


@pytest.mark.parametrize("missing", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_missing_geometry_never_identity(tmp_path: Path, missing):
    write_series(tmp_path, _random_ct((8, 8, 3)), seed=1, **{missing: None})
    with pytest.raises(GeometryError) as err:
        load_volume(tmp_path)
    assert err.value.code == "MISSING_GEOMETRY"


# --- B1 / B9 -----------------------------------------------------------------------------
def test_mixed_series_refused_then_picked(tmp_path: Path):
    arr = _random_ct((8, 8, 4))
    write_series(tmp_path, arr, series_number=2, series_description="AXIAL", seed=1)
    write_series(tmp_path, arr[:, :, :2] + 5, series_number=1, series_description="SCOUT",
                 seed=2)
    with pytest.raises(MixedSeriesError) as err:
        load_volume(tmp_path)
    text = str(err.value)
    assert err.value.code == "MIXED_SERIES"
    assert "AXIAL" in text and "SCOUT" in text and "CT" in text
    assert "[0]" in text and "[1]" in text
    by_desc = load_volume(tmp_path, series="AXIAL")
    np.testing.assert_array_equal(by_desc.array, arr)
    assert "OTHER_SERIES" in [f.code for f in by_desc.issues]
    by_index = load_volume(tmp_path, series=0)  # SCOUT has the lower series number
    assert by_index.shape == (8, 8, 2)
    by_key = load_volume(tmp_path, series=by_desc.meta["series_key"])
    np.testing.assert_array_equal(by_key.array, arr)
    with pytest.raises(MixedSeriesError):
        load_volume(tmp_path, series="NOPE")


def test_empty_folder_and_no_images(tmp_path: Path):
    with pytest.raises(NoImagesError):
        load_volume(tmp_path)
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(NoImagesError) as err:
        load_volume(tmp_path)
    assert err.value.code == "NO_IMAGES"


# --- C1-C3 intensities -------------------------------------------------------------------
def test_per_slice_fractional_rescale_and_signed_pixels(tmp_path: Path):
    shape = (8, 8, 4)
    rescales = [(1.0, -1024.0), (0.5, -1024.0), (2.0, -2048.0), (0.25, 0.0)]
    arr = np.empty(shape)
    for k, (slope, inter) in enumerate(rescales):
        stored = RNG.integers(-2000, 4000, shape[:2])  # signed storage needed
        arr[..., k] = stored * slope + inter
    write_series(tmp_path, arr, rescale=rescales, seed=3, shuffle_files=True)
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert vol.array.min() < -1000  # no wraparound


def test_air_is_minus_1000_hu(tmp_path: Path):
    write_series(tmp_path, np.full((8, 8, 3), -1000.0), seed=1)
    assert float(load_volume(tmp_path).array.mean()) == pytest.approx(-1000.0)


def test_nan_rescale_refused(tmp_path: Path):
    with pytest.warns(UserWarning):  # pydicom warns while writing the invalid DS
        write_series(tmp_path, _random_ct((8, 8, 3)), RescaleSlope="NaN", seed=1)
    with pytest.raises(InvalidValuesError):
        load_volume(tmp_path)


def test_gap_in_short_series_is_missing_slice(tmp_path: Path):
    arr = _random_ct((8, 8, 4))
    write_series(tmp_path, arr, missing_indices=(1,), seed=2)  # gaps 5.0, 2.5
    vol = load_volume(tmp_path)
    missing = next(f for f in vol.issues if f.code == "MISSING_SLICES")
    assert missing.details["positions_mm"] == [pytest.approx(2.5, abs=1e-3)]
    assert vol.shape == (8, 8, 4)


def test_deliberate_spacing_change_is_uneven_not_missing(tmp_path: Path):
    arr = _random_ct((8, 8, 8))
    positions = [0.0, 2.0, 4.0, 6.0, 10.0, 14.0, 18.0, 22.0]
    write_series(tmp_path, arr, slice_positions=positions, seed=2)
    vol = load_volume(tmp_path)
    codes = [f.code for f in vol.issues]
    assert "UNEVEN_SPACING_RESAMPLED" in codes and "MISSING_SLICES" not in codes


def test_localizer_inside_series_set_aside(tmp_path: Path):
    arr = _random_ct((8, 8, 4))
    uid = "1.2.826.0.1.3680043.8.498.77"
    write_series(tmp_path, arr, series_uid=uid, seed=1)
    scout = series_affine((10, 8, 1), spacing=(1.0, 1.0, 1.0))
    scout[:3, :3] = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # coronal
    write_series(tmp_path, _random_ct((10, 8, 1)), affine=scout, series_uid=uid, seed=2,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    vol = load_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, arr)
    assert "LOCALIZER_EXCLUDED" in [f.code for f in vol.issues]
