"""Preprocessing: exact geometry of every step, intensity presets, map back to source."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medfusion.errors import MedfusionError, PreprocessError, RecipeError
from medfusion.preprocess import (
    RoleSpec,
    crop_or_pad,
    map_to_source,
    normalize_xray,
    prepare_volume,
    resample_to_spacing,
    resize_to_shape,
    select_channel,
    standardize_mr,
    to_canonical,
    to_tensor_input,
    window_ct,
)
from medfusion.types import Volume

# --- fixtures made by code ----------------------------------------------------------------


def lps_affine(spacing=(0.8, 0.8, 2.5), origin=(40.0, 30.0, -20.0)) -> np.ndarray:
    """An axial DICOM-style grid: i -> left, j -> posterior, k -> superior."""
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def oblique_affine(deg: float = 20.0, spacing=(0.9, 1.1, 2.0)) -> np.ndarray:
    """LPS-like grid rotated about z and x: no axis is aligned with the world."""
    t = np.radians(deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    c, s = np.cos(t / 2), np.sin(t / 2)
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    a[:3, 3] = (12.0, -7.0, 3.0)
    return a


def world_coords(shape, affine) -> np.ndarray:
    """(3, I, J, K) world coordinates of every voxel centre."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ idx + affine[:3, 3:4]
    return xyz.reshape(3, *shape)


GRAD = np.array([0.7, -1.3, 2.1])


def linear_volume(shape, affine, modality="CT") -> Volume:
    """Values = a linear function of world position: linear interpolation and box averages
    reproduce it exactly, so any geometric error shows up as a value error."""
    xyz = world_coords(shape, affine)
    arr = np.tensordot(GRAD, xyz, axes=1) + 5.0
    return Volume(arr.astype(np.float32), affine, modality=modality)


def expected_linear(v: Volume) -> np.ndarray:
    return np.tensordot(GRAD, world_coords(v.spatial_shape, v.affine), axes=1) + 5.0


def blob_volume(shape, affine, centre_world, sigma_mm=6.0, modality="CT", base=-1000.0,
                height=1400.0) -> Volume:
    xyz = world_coords(shape, affine)
    d2 = sum((xyz[i] - centre_world[i]) ** 2 for i in range(3))
    arr = base + height * np.exp(-d2 / (2 * sigma_mm**2))
    return Volume(arr.astype(np.float32), affine, modality=modality)


def centroid_world(v: Volume, values: np.ndarray | None = None) -> np.ndarray:
    w = np.asarray(v.array if values is None else values, dtype=np.float64)
    w = np.clip(w - np.percentile(w, 50), 0, None)
    xyz = world_coords(v.spatial_shape, v.affine)
    return np.array([(xyz[i] * w).sum() / w.sum() for i in range(3)])


def peak_world(v: Volume) -> np.ndarray:
    idx = np.unravel_index(int(np.argmax(v.array)), v.spatial_shape)
    return v.affine[:3, :3] @ np.array(idx, dtype=float) + v.affine[:3, 3]


def interior(a: np.ndarray, m: int = 1) -> np.ndarray:
    return a[m:-m, m:-m, m:-m]


# --- exact affines ------------------------------------------------------------------------


def test_to_canonical_lps_is_exact_and_matches_nibabel():
    v = linear_volume((10, 12, 7), lps_affine())
    c = to_canonical(v)
    assert c.orientation == ("R", "A", "S")
    ref = nib.as_closest_canonical(nib.Nifti1Image(v.array, v.affine))
    np.testing.assert_array_equal(c.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(c.affine, ref.affine, atol=1e-12)
    np.testing.assert_allclose(c.array, expected_linear(c), atol=1e-3)
    assert c.history[-1].name == "to_canonical"
    assert c.history[-1].input_shape == (10, 12, 7)


def test_to_canonical_oblique_keeps_every_voxel_in_place():
    v = linear_volume((9, 11, 6), oblique_affine())
    c = to_canonical(v)
    assert c.orientation == ("R", "A", "S")
    assert c.array.shape == (9, 11, 6)
    # No interpolation: each voxel's value equals the function at its new world position.
    np.testing.assert_allclose(c.array, expected_linear(c), atol=1e-3)


def test_to_canonical_keeps_xray_depth_last():
    # A radiograph as the loader gives it: i to the left, j down (inferior), K == 1.
    a = np.array([[-0.6, 0, 0, 100], [0, 0, -1.0, 0], [0, -0.6, 0, 200], [0, 0, 0, 1.0]])
    v = linear_volume((20, 30, 1), a, modality="DX")
    c = to_canonical(v)
    assert c.array.shape == (20, 30, 1)
    assert c.orientation[:2] == ("R", "S")
    np.testing.assert_allclose(c.array, expected_linear(c), atol=1e-3)


@pytest.mark.parametrize("affine", [lps_affine(), oblique_affine()])
def test_resample_to_spacing_keeps_world_positions(affine):
    v = linear_volume((24, 20, 10), affine)
    r = resample_to_spacing(v, (2.0, 1.7, 1.0))
    np.testing.assert_allclose(r.spacing, (2.0, 1.7, 1.0), atol=1e-9)
    # Field-of-view centre unchanged.
    centre = lambda vol: vol.affine[:3, :3] @ ((np.array(vol.spatial_shape) - 1) / 2) \
        + vol.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(r), centre(v), atol=1e-9)
    np.testing.assert_allclose(interior(r.array), interior(expected_linear(r)), atol=2e-3)


def test_resize_to_shape_tiles_the_same_field_of_view():
    v = linear_volume((30, 25, 9), lps_affine())
    r = resize_to_shape(v, (12, 10, 18))
    assert r.array.shape == (12, 10, 18)
    # Edge to edge: n * spacing is unchanged on every axis, and so is the centre.
    np.testing.assert_allclose(np.array(r.spacing) * (12, 10, 18),
                               np.array(v.spacing) * (30, 25, 9), atol=1e-9)
    first_edge = lambda vol: vol.affine[:3, :3] @ np.full(3, -0.5) + vol.affine[:3, 3]  # noqa
    np.testing.assert_allclose(first_edge(r), first_edge(v), atol=1e-9)
    np.testing.assert_allclose(interior(r.array), interior(expected_linear(r)), atol=2e-3)


def test_crop_or_pad_translates_affine_exactly():
    v = linear_volume((10, 9, 8), lps_affine())
    out = crop_or_pad(v, (6, 13, 8), value=-7.0)
    assert out.array.shape == (6, 13, 8)
    # Cropped axis: kept voxels keep their values at their (shifted) world positions.
    exp = expected_linear(out)
    np.testing.assert_allclose(out.array[:, 2:11, :], exp[:, 2:11, :], atol=1e-3)
    assert np.all(out.array[:, :2, :] == -7.0) and np.all(out.array[:, 11:, :] == -7.0)


def test_known_world_point_lands_where_expected():
    """A single bright voxel at a known world point stays at that point through resize."""
    aff = lps_affine(spacing=(1.0, 1.0, 3.0))
    arr = np.zeros((32, 32, 12), np.float32)
    arr[20, 8, 5] = 1.0
    point = aff @ np.array([20, 8, 5, 1.0])
    v = Volume(arr, aff, modality="CT")
    c = to_canonical(v)
    idx = np.argwhere(c.array == 1.0)[0]
    np.testing.assert_allclose(c.affine @ np.r_[idx, 1.0], point, atol=1e-9)
    r = resample_to_spacing(v, (1.0, 1.0, 1.0), order=0)
    idx = np.argwhere(r.array == 1.0)
    assert len(idx) >= 1
    worlds = np.array([r.affine @ np.r_[i, 1.0] for i in idx])
    assert np.abs(worlds - point).max() <= 1.5 + 1e-6  # within half a 3 mm source voxel


def test_upsampling_matches_scipy_linear_interpolation():
    rng = np.random.default_rng(1)
    v = Volume(rng.normal(size=(8, 9, 7)).astype(np.float32), lps_affine(), modality="CT")
    r = resample_to_spacing(v, (0.5, 0.6, 1.3))
    m = np.linalg.solve(v.affine, r.affine)
    ref = ndimage.affine_transform(v.array.astype(np.float64), m[:3, :3], offset=m[:3, 3],
                                   output_shape=r.array.shape, order=1, mode="nearest")
    np.testing.assert_allclose(r.array, ref, atol=1e-5)


# --- prepare_volume -----------------------------------------------------------------------


def sheared_affine() -> np.ndarray:
    """A gantry-tilt-like sheared grid (k column leans along j), kept as is by the loader."""
    a = lps_affine()
    a[1, 2] = 0.9
    return a


@pytest.mark.parametrize("affine", [lps_affine(), oblique_affine(), sheared_affine()],
                         ids=["lps", "oblique", "sheared"])
@pytest.mark.parametrize("fit,spacing", [("resize", None), ("crop_pad", (2.0, 2.0, 2.0))])
def test_prepare_volume_geometry_is_exact(fit, spacing, affine):
    v = linear_volume((40, 36, 14), affine, modality="MR")
    spec = RoleSpec(grid=(16, 16, 16), spacing=spacing, normalization="none", fit=fit)
    p = prepare_volume(v, spec)
    assert p.array.shape == (16, 16, 16) and p.array.dtype == np.float32
    assert p.orientation == ("R", "A", "S")
    if spacing is not None:
        np.testing.assert_allclose(p.spacing, spacing, atol=1e-9)
    # Source index of every output voxel; where it lies a voxel inside the source grid the
    # value must be exact (linear data), elsewhere (padding) it is the constant pad value.
    m = np.linalg.solve(v.affine, p.affine)
    idx = np.indices(p.spatial_shape).reshape(3, -1)
    src = (m[:3, :3] @ idx + m[:3, 3:4]).reshape(3, *p.spatial_shape)
    n = np.array(v.spatial_shape).reshape(3, 1, 1, 1)
    inside = ((src >= 1.0) & (src <= n - 2.0)).all(axis=0)
    assert inside.sum() > 500
    np.testing.assert_allclose(p.array[inside], expected_linear(p)[inside], atol=5e-3)
    outside = ((src < -0.5) | (src > n - 0.5)).any(axis=0)
    if fit == "crop_pad":
        assert outside.any()
        np.testing.assert_array_equal(p.array[outside], p.array.min())
    else:
        assert not outside.any()


def test_prepare_equals_step_by_step_composition():
    v = blob_volume((48, 40, 16), lps_affine(), (30.0, 14.0, -5.0))
    spec = RoleSpec(grid=(24, 24, 24), spacing=(2.0, 2.0, 2.0), normalization="ct",
                    fit="crop_pad")
    fused = prepare_volume(v, spec)
    c = to_canonical(v)
    r = resample_to_spacing(c, (2.0, 2.0, 2.0))
    cp = crop_or_pad(r, (24, 24, 24), value=float(r.array.min()))
    w = window_ct(cp, -1000.0, 1000.0)
    np.testing.assert_allclose(fused.affine, w.affine, atol=1e-9)
    assert [s.name for s in fused.history] == [s.name for s in w.history]
    np.testing.assert_allclose(fused.array, w.array, atol=1e-5)


def test_blob_centroid_preserved_by_anisotropic_resampling():
    aff = lps_affine(spacing=(0.7, 0.7, 4.0))
    centre = (25.0, 10.0, 2.0)
    v = blob_volume((96, 96, 12), aff, centre, sigma_mm=5.0)
    for spec in (RoleSpec(grid=(32, 32, 32), normalization="ct"),
                 RoleSpec(grid=(32, 32, 32), spacing=(1.5, 1.5, 1.5), fit="crop_pad",
                          normalization="ct")):
        p = prepare_volume(v, spec)
        err = np.linalg.norm(centroid_world(p) - centre)
        assert err < min(p.spacing), (spec, err)


def test_xray_depth_one():
    a = np.array([[-0.6, 0, 0, 100], [0, 0, -1.0, 0], [0, -0.6, 0, 200], [0, 0, 0, 1.0]])
    v = blob_volume((300, 240, 1), a, tuple(a @ np.array([150, 60, 0, 1.0]))[:3], sigma_mm=8,
                    modality="DX", base=100.0, height=900.0)
    for spec in (RoleSpec(grid=(64, 64, 1)),
                 RoleSpec(grid=(64, 64, 1), spacing=(2.0, 2.0, 2.0), fit="crop_pad")):
        p = prepare_volume(v, spec)
        assert p.array.shape == (64, 64, 1)
        assert 0.0 <= p.array.min() and p.array.max() <= 1.0
        assert p.spacing[2] == pytest.approx(1.0)  # depth column kept
        # Percentile clipping flattens the peak: compare centroids.
        assert np.linalg.norm(centroid_world(p) - peak_world(v)) < max(p.spacing[:2])
        assert to_tensor_input(p).shape == (1, 64, 64, 1)


# --- map back to the source grid ----------------------------------------------------------


@pytest.mark.parametrize("affine", [lps_affine(spacing=(0.9, 0.9, 3.0)), oblique_affine()])
@pytest.mark.parametrize("fit", ["resize", "crop_pad"])
def test_map_to_source_round_trip(affine, fit):
    shape = (64, 56, 14)
    centre = tuple((affine @ np.array([40, 20, 8, 1.0]))[:3])
    src = blob_volume(shape, affine, centre, sigma_mm=5.0)
    spec = RoleSpec(grid=(24, 24, 24), spacing=(2.5, 2.5, 2.5) if fit == "crop_pad" else None,
                    fit=fit, normalization="ct")
    p = prepare_volume(src, spec)
    back = map_to_source(p.array, p, src)
    assert back.array.shape == src.array.shape and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.affine, src.affine)
    voxel = max(src.spacing)
    assert np.linalg.norm(peak_world(back) - peak_world(src)) <= voxel
    assert np.isfinite(back.array).all()


def test_map_to_source_outside_is_zero_and_nifti_round_trip(tmp_path):
    import SimpleITK as sitk

    src = blob_volume((40, 40, 10), lps_affine(), (20.0, 14.0, -8.0))
    # Crop to a small central field of view: source voxels outside it must get 0.
    p = prepare_volume(src, RoleSpec(grid=(8, 8, 8), spacing=(2.0, 2.0, 2.0), fit="crop_pad",
                                     normalization="none"))
    back = map_to_source(np.ones(p.spatial_shape, np.float32), p, src)
    assert back.array[0, 0, 0] == 0.0 and back.array[20, 20, 5] == pytest.approx(1.0)
    path = tmp_path / "sal.nii.gz"
    nib.save(nib.Nifti1Image(back.array, back.affine), path)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), back.array)
    s = sitk.ReadImage(str(path))
    assert s.GetSize() == src.spatial_shape
    np.testing.assert_allclose(s.GetSpacing(), src.spacing, atol=1e-5)


def test_map_to_source_between_oblique_grids():
    """A map on an axis-aligned grid brought onto an oblique scanner grid (the general,
    non-separable path): the peak lands within a voxel, outside the map's field of view 0."""
    src = Volume(np.zeros((40, 36, 16), np.float32), oblique_affine(), modality="MR")
    centre = src.affine @ np.array([22, 15, 8, 1.0])
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    aff[:3, 3] = centre[:3] - 1.5 * 10
    ras = blob_volume((20, 20, 20), aff, tuple(centre[:3]), sigma_mm=3.0, base=0.0, height=1.0)
    back = map_to_source(ras.array, ras, src)
    assert back.array.shape == src.array.shape
    np.testing.assert_array_equal(back.affine, src.affine)
    assert np.linalg.norm(peak_world(back) - centre[:3]) <= max(src.spacing)
    assert back.array[0, 0, 0] == 0.0


def test_spatial_steps_apply_to_each_volume_of_4d():
    rng = np.random.default_rng(5)
    v = Volume(rng.normal(size=(10, 12, 6, 2)).astype(np.float32), lps_affine(), modality="MR")
    r = resize_to_shape(v, (5, 6, 6))
    assert r.array.shape == (5, 6, 6, 2)
    one = resize_to_shape(select_channel(v, 1), (5, 6, 6))
    np.testing.assert_allclose(r.array[..., 1], one.array, atol=1e-6)
    assert to_canonical(v).array.shape == (10, 12, 6, 2)


def test_map_to_source_refuses_wrong_shape_and_nan():
    src = blob_volume((16, 16, 8), lps_affine(), (0.0, 0.0, 0.0))
    p = prepare_volume(src, RoleSpec(grid=(8, 8, 8)))
    with pytest.raises(PreprocessError) as e:
        map_to_source(np.zeros((7, 8, 8)), p, src)
    assert e.value.code == "SHAPE_MISMATCH"
    assert map_to_source(np.zeros((1, 8, 8, 8)), p, src).array.shape == (16, 16, 8)
    import torch

    cam = torch.ones((1, 8, 8, 8), requires_grad=True) * 0.5  # as Grad-CAM hands it over
    assert map_to_source(cam, p, src).array[8, 8, 4] == pytest.approx(0.5)
    empty = Volume(np.zeros((0, 4, 4), np.float32), np.eye(4))
    with pytest.raises(PreprocessError) as e:
        prepare_volume(empty, RoleSpec(grid=(4, 4, 4), normalization="none"))
    assert e.value.code == "EMPTY_VOLUME"
    bad = np.zeros((8, 8, 8))
    bad[0, 0, 0] = np.nan
    with pytest.raises(PreprocessError) as e:
        map_to_source(bad, p, src)
    assert e.value.code == "INVALID_VALUES"


# --- intensity presets --------------------------------------------------------------------


def test_ct_window_air_zero_bone_one():
    v = Volume(np.array([-3024, -1000, 0, 1000, 3000], np.float32).reshape(5, 1, 1),
               np.eye(4), modality="CT")
    out = window_ct(v, -1000, 1000).array.ravel()
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-7)
    p = prepare_volume(blob_volume((20, 20, 10), lps_affine(), (0, 0, 0)),
                       RoleSpec(grid=(8, 8, 8), normalization="auto"))
    assert p.array.min() == pytest.approx(0.0, abs=1e-3)  # air background


def test_mr_standardization_robust_to_outliers():
    rng = np.random.default_rng(3)
    head = np.zeros((24, 24, 24), np.float32)
    head[4:20, 4:20, 4:20] = rng.normal(300, 40, (16, 16, 16))
    head += rng.normal(0, 3, head.shape).astype(np.float32)  # air noise
    clean = standardize_mr(Volume(head, np.eye(4), modality="MR"))
    spiked = head.copy()
    spiked.ravel()[rng.choice(head.size, 20, replace=False)] = 1e6  # 0.14 % hot voxels
    dirty = standardize_mr(Volume(spiked, np.eye(4), modality="MR"))
    fg = clean.array[4:20, 4:20, 4:20]
    assert abs(fg.mean()) < 0.1 and abs(fg.std() - 1) < 0.1
    normal = spiked < 1e5
    assert np.abs(dirty.array[normal] - clean.array[normal]).max() < 0.1
    assert np.isfinite(dirty.array).all() and dirty.array.max() < 10


def test_xray_normalization_and_constant_image():
    rng = np.random.default_rng(4)
    img = rng.uniform(100, 4000, (50, 40, 1)).astype(np.float32)
    img[0, 0, 0] = 65535  # burnt-in marker
    out = normalize_xray(Volume(img, np.eye(4), modality="CR")).array
    assert out.min() == 0.0 and out.max() == 1.0 and np.median(out) > 0.3
    const = normalize_xray(Volume(np.full((5, 5, 1), 7.0, np.float32), np.eye(4))).array
    assert np.all(const == 0.0)


# --- contract: errors, determinism, serialisation -----------------------------------------


def test_roles_spec_json_round_trip_and_validation():
    spec = RoleSpec(grid=(64, 64, 1), spacing=(0.5, 0.5, 1.0), normalization="xray",
                    ct_window=(-160.0, 240.0), fit="crop_pad")
    back = RoleSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    for bad in ({"grid": [0, 4, 4]}, {"grid": [4, 4]}, {"grid": [4, 4, 4], "fit": "zoom"},
                {"grid": [4, 4, 4], "ct_window": [10, -10]}, {"grid": [4, 4, 4], "oops": 1},
                {"grid": [4, 4, 4], "spacing": [1, 0, 1]}, {"spacing": [1, 1, 1]}):
        with pytest.raises(RecipeError):
            RoleSpec.from_dict(bad)


def test_4d_refused_unless_channel_rule_first():
    arr = np.random.default_rng(0).normal(size=(12, 12, 6, 3)).astype(np.float32)
    v = Volume(arr, lps_affine(), modality="MR")
    with pytest.raises(PreprocessError) as e:
        prepare_volume(v, RoleSpec(grid=(8, 8, 8)))
    assert e.value.code == "NOT_3D"
    with pytest.raises(PreprocessError):
        to_tensor_input(v)
    p = prepare_volume(v, RoleSpec(grid=(8, 8, 8), channel_rule="first"))
    assert p.array.shape == (8, 8, 8) and p.history[0].name == "select_channel"
    ref = prepare_volume(select_channel(v, 0), RoleSpec(grid=(8, 8, 8)))
    np.testing.assert_array_equal(p.array, ref.array)


def test_auto_normalization_unknown_modality():
    v = blob_volume((16, 16, 8), lps_affine(), (0, 0, 0), modality="unknown")
    with pytest.raises(PreprocessError) as e:
        prepare_volume(v, RoleSpec(grid=(8, 8, 8)))
    assert e.value.code == "UNKNOWN_MODALITY" and isinstance(e.value, MedfusionError)
    p = prepare_volume(v, RoleSpec(grid=(8, 8, 8)), role="ct")
    assert p.history[-1].name == "window_ct"


def test_nan_input_refused():
    v = blob_volume((16, 16, 8), lps_affine(), (0, 0, 0))
    arr = v.array.copy()
    arr[8, 8, 4] = np.nan
    with pytest.raises(PreprocessError) as e:
        prepare_volume(v.replace(array=arr), RoleSpec(grid=(8, 8, 8)))
    assert e.value.code == "INVALID_VALUES"


def test_deterministic_finite_and_history_is_json():
    v = blob_volume((50, 44, 12), oblique_affine(), (10.0, -5.0, 4.0), modality="MR")
    spec = RoleSpec(grid=(16, 16, 16), spacing=(3.0, 3.0, 3.0), fit="crop_pad")
    a, b = prepare_volume(v, spec), prepare_volume(v, spec)
    assert a.array.tobytes() == b.array.tobytes()
    assert np.isfinite(a.array).all() and a.array.dtype == np.float32
    text = json.dumps([s.to_dict() for s in a.history])
    assert [s["name"] for s in json.loads(text)] == [
        "to_canonical", "resample_to_spacing", "crop_or_pad", "standardize_mr"]
    # Each step records the grid it started from: the chain of input grids is consistent.
    assert a.history[0].input_shape == v.shape
    np.testing.assert_allclose(np.array(a.history[0].input_affine), v.affine)


def test_real_mr_reference_canonical_matches_nibabel(shared_data):
    """dcm2niix's GE MR output (a real scanner affine): to_canonical == nibabel."""
    path = shared_data / "dicom/dcm_qa_nih/Ref/DCM2NIIX_regression_test_4.nii"
    if not path.exists():
        pytest.skip("GE MR reference not present")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)[..., 0]
    v = Volume(data, img.affine, modality="MR")
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    c = to_canonical(v)
    np.testing.assert_array_equal(c.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(c.affine, ref.affine, atol=1e-6)
    p = prepare_volume(v, RoleSpec(grid=(32, 32, 16)))
    back = map_to_source(p.array, p, v)
    assert back.array.shape == v.array.shape
    np.testing.assert_array_equal(back.affine, v.affine)
    # The round trip of a real (smooth, low-res) image stays close to the image itself.
    corr = np.corrcoef(back.array.ravel(), standardize_mr(v).array.ravel())[0, 1]
    assert corr > 0.9


def test_memory_layout_does_not_change_the_result():
    """Fortran-ordered or flipped source arrays (as DICOM stacks come) resample identically."""
    v = blob_volume((30, 26, 12), lps_affine(), (5.0, 3.0, -2.0))
    spec = RoleSpec(grid=(16, 16, 16), normalization="ct")
    ref = prepare_volume(v, spec).array
    fortran = v.replace(array=np.asfortranarray(v.array))
    np.testing.assert_allclose(prepare_volume(fortran, spec).array, ref, atol=1e-6)
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = 25
    flipped = Volume(v.array[:, ::-1], v.affine @ flip, modality="CT")
    np.testing.assert_allclose(prepare_volume(flipped, spec).array, ref, atol=1e-5)


def test_synthetic_lesion_lands_on_its_world_position():
    """The project's synthetic subjects (CT, MR, radiograph frames): after preparation the
    voxel at the lesion's world position is among the brightest."""
    from medfusion.testing.synthetic import make_subject

    subject = make_subject(3, 1)
    specs = {"ct": RoleSpec(grid=(32, 32, 32), normalization="ct"),
             "mr": RoleSpec(grid=(32, 32, 32), normalization="mr"),
             "xray": RoleSpec(grid=(48, 48, 1), normalization="xray")}
    for role, spec in specs.items():
        p = prepare_volume(subject.volume(role), spec)
        idx = np.linalg.solve(p.affine, np.r_[subject.lesion_world[role], 1.0])[:3]
        value = p.array[tuple(int(round(x)) for x in idx)]
        assert value >= np.percentile(p.array, 97), role


@pytest.mark.parametrize("factors", [(2, 2, 1), (5, 5, 2), (4, 3, 7)])
def test_box_average_is_the_mean_of_each_window_partial_ones_included(factors):
    # Both the avg_pool3d path (small boxes) and the slab-by-slab path (large ones), on
    # a shape that leaves a partial last window along every axis.
    from medfusion.preprocess.grid import _box_average

    rng = np.random.default_rng(3)
    arr = rng.normal(size=(23, 17, 15)).astype(np.float32)
    got = _box_average(torch.from_numpy(arr), factors).numpy()
    starts = [range(0, n, k) for n, k in zip(arr.shape, factors, strict=True)]
    assert got.shape == tuple(len(r) for r in starts)
    for a, i in enumerate(starts[0]):
        for b, j in enumerate(starts[1]):
            for c, k in enumerate(starts[2]):
                window = arr[i:i + factors[0], j:j + factors[1], k:k + factors[2]]
                assert got[a, b, c] == pytest.approx(float(window.mean()), abs=1e-5)
