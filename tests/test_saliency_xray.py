"""Saliency outputs of a radiograph (K = 1) through the real scoring path: the NIfTI lies on
the grid ITK viewers give the source DICOM, the PNG is one 2D panel drawn to scale.

Uses the bundled demo model and sample DX, and the real CR hip radiograph of the NEMA WG04
set when the shared data folder is present.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medfusion
from medfusion.explain.export import PLANAR_LONG_SIDE, write_explanation
from medfusion.types import Explanation, Study, Volume

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"
SAMPLE_STUDY = SAMPLES / "studies" / "study-001"  # abnormal: a lesion in every role
SAMPLE_DX = SAMPLE_STUDY / "xray.dcm"
SHARED = Path(os.environ.get("MEDFUSION_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_CR = SHARED / "dicom" / "wg04" / "REF" / "RG2_UNC.dcm"


@pytest.fixture(scope="module")
def model() -> medfusion.FusionModel:
    return medfusion.FusionModel.load(SAMPLES / "demo_model")


@pytest.fixture(scope="module")
def sample_outputs(model, tmp_path_factory) -> tuple[Study, Explanation, dict[str, Path]]:
    """The sample study scored with explain=True and written as the scoring path does."""
    study = medfusion.load_study(SAMPLE_STUDY)
    assert "xray" in study.volumes and study.volumes["xray"].spatial_shape[2] == 1
    explanation = model.predict(study, explain=True, cam_method="gradcam").explanation
    assert explanation is not None
    out = tmp_path_factory.mktemp("saliency")
    written = write_explanation(explanation, out, "st-sample", images=dict(study.volumes))
    return study, explanation, written


@pytest.fixture(scope="module")
def real_cr_outputs(model, tmp_path_factory) -> tuple[Volume, Explanation, dict[str, Path]]:
    if not REAL_CR.is_file():
        pytest.skip(f"real CR radiograph not found under {SHARED} (set MEDFUSION_SHARED_DATA "
                    "to the shared reference data folder)")
    source = medfusion.load_volume(REAL_CR)
    explanation = model.predict(Study(key="st-cr", volumes={"xray": source}),
                                explain=True).explanation
    assert explanation is not None
    out = tmp_path_factory.mktemp("saliency_cr")
    written = write_explanation(explanation, out, "st-cr", images={"xray": source})
    return source, explanation, written


def _geometry(image: sitk.Image) -> dict[str, np.ndarray]:
    return {"size": np.asarray(image.GetSize()), "origin": np.asarray(image.GetOrigin()),
            "spacing": np.asarray(image.GetSpacing()),
            "direction": np.asarray(image.GetDirection()).reshape(3, 3)}


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return np.asarray(mpimg.imread(str(path)), dtype=np.float64)[..., :3]


def _assert_ras_affine_read_back(nii: Path, saliency: Volume, source: Volume) -> None:
    """nibabel and SimpleITK read the map's array and the source's affine back."""
    img = nib.load(str(nii))
    assert img.shape == source.spatial_shape
    np.testing.assert_array_equal(np.asarray(img.dataobj), saliency.array)
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    itk = sitk.ReadImage(str(nii))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0),
                                  saliency.array)
    g = _geometry(itk)
    lps = np.eye(4)
    lps[:3, :3] = g["direction"] * g["spacing"]
    lps[:3, 3] = g["origin"]
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, source.affine, atol=1e-5)


# ---- NIfTI: on the source grid ----------------------------------------------------------


def test_sample_dx_nifti_has_the_loader_affine(sample_outputs) -> None:
    study, explanation, written = sample_outputs
    source = medfusion.load_volume(SAMPLE_DX)
    np.testing.assert_array_equal(study.volumes["xray"].affine, source.affine)
    _assert_ras_affine_read_back(written["xray.nii.gz"], explanation.saliency["xray"], source)


def test_sample_dx_nifti_lies_on_the_grid_itk_reads_from_the_dicom(sample_outputs) -> None:
    _, _, written = sample_outputs
    dicom, nifti = _geometry(sitk.ReadImage(str(SAMPLE_DX))), \
        _geometry(sitk.ReadImage(str(written["xray.nii.gz"])))
    np.testing.assert_array_equal(nifti["size"], dicom["size"])
    np.testing.assert_allclose(nifti["origin"], dicom["origin"], atol=0.01)
    np.testing.assert_allclose(nifti["spacing"], dicom["spacing"], atol=1e-6)
    np.testing.assert_allclose(nifti["direction"], dicom["direction"], atol=1e-6)


def test_real_cr_nifti_has_the_loader_affine_and_the_header_spacing(real_cr_outputs) -> None:
    source, explanation, written = real_cr_outputs
    _assert_ras_affine_read_back(written["xray.nii.gz"], explanation.saliency["xray"], source)
    nifti = _geometry(sitk.ReadImage(str(written["xray.nii.gz"])))
    dicom = _geometry(sitk.ReadImage(str(REAL_CR)))
    np.testing.assert_array_equal(nifti["size"], dicom["size"])  # (cols, rows, 1)
    np.testing.assert_allclose(nifti["origin"], dicom["origin"], atol=0.01)
    # GDCM takes a CR's spacing from ImagerPixelSpacing only (absent here: it reads 1 mm);
    # medfusion uses the PixelSpacing the file declares, (row, column) = (0.2, 0.2)
    ds = pydicom.dcmread(REAL_CR, stop_before_pixels=True)
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    np.testing.assert_allclose(nifti["spacing"], [col_sp, row_sp, 1.0], atol=1e-6)


def test_real_cr_nifti_has_the_direction_itk_reads_from_the_dicom(real_cr_outputs) -> None:
    _, _, written = real_cr_outputs
    nifti = _geometry(sitk.ReadImage(str(written["xray.nii.gz"])))
    dicom = _geometry(sitk.ReadImage(str(REAL_CR)))
    np.testing.assert_allclose(nifti["direction"], dicom["direction"], atol=1e-6)


def test_3d_ct_and_mr_niftis_read_back_as_their_sources(sample_outputs) -> None:
    study, explanation, written = sample_outputs
    for role in ("ct", "mr"):
        _assert_ras_affine_read_back(written[f"{role}.nii.gz"], explanation.saliency[role],
                                     study.volumes[role])
    # and the CT map lies on the grid ITK reads from the CT DICOM series itself
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SAMPLE_STUDY / "ct")))
    dicom = _geometry(reader.Execute())
    nifti = _geometry(sitk.ReadImage(str(written["ct.nii.gz"])))
    np.testing.assert_array_equal(nifti["size"], dicom["size"])
    np.testing.assert_allclose(nifti["origin"], dicom["origin"], atol=0.01)
    np.testing.assert_allclose(nifti["spacing"], dicom["spacing"], atol=1e-5)
    np.testing.assert_allclose(nifti["direction"], dicom["direction"], atol=1e-6)


# ---- PNG: one 2D panel for a radiograph, a montage for a volume ---------------------------


def _hot(rgb: np.ndarray) -> np.ndarray:
    """Where the jet overlay is in its upper half (red over blue)."""
    return rgb[..., 0] - rgb[..., 2]


def _at(rgb: np.ndarray, shape_ij: tuple[int, int], ij: tuple[int, int]) -> np.ndarray:
    """The PNG pixels (a 5 x 5 patch) over array pixel (i, j): i -> x, j -> y (top down)."""
    h, w = rgb.shape[:2]
    x = int((ij[0] + 0.5) / shape_ij[0] * w)
    y = int((ij[1] + 0.5) / shape_ij[1] * h)
    return rgb[max(0, y - 2):y + 3, max(0, x - 2):x + 3]


def _assert_planar_panel(png: Path, saliency: Volume, expected_wh: tuple[int, int]) -> None:
    rgb = _png(png)
    assert rgb.shape[:2] == (expected_wh[1], expected_wh[0])
    assert max(rgb.shape[:2]) >= 256 and rgb.shape[0] > 100
    sal = np.asarray(saliency.array)[:, :, 0]
    peak = np.unravel_index(int(np.argmax(sal)), sal.shape)
    low = np.unravel_index(int(np.argmin(sal)), sal.shape)
    assert float(np.median(_hot(_at(rgb, sal.shape, peak)))) > 0.15
    assert float(np.median(_hot(_at(rgb, sal.shape, low)))) < 0.0


def test_sample_dx_png_is_one_panel_with_the_peak_hot(sample_outputs) -> None:
    _, explanation, written = sample_outputs
    # 64 x 64 pixels of 0.6 x 0.6 mm: square
    _assert_planar_panel(written["xray.png"], explanation.saliency["xray"], (512, 512))


def test_real_cr_png_is_one_panel_in_the_radiograph_aspect(real_cr_outputs) -> None:
    source, explanation, written = real_cr_outputs
    # 1760 columns x 2140 rows of 0.2 mm: 352 x 428 mm
    width = round(PLANAR_LONG_SIDE * 1760 / 2140)
    _assert_planar_panel(written["xray.png"], explanation.saliency["xray"], (width, 512))


def test_planar_png_aspect_orientation_and_background(tmp_path: Path) -> None:
    """Non-square pixels, an off-centre peak: the panel is drawn to scale, first row at the
    top, first column on the left, the radiograph visible where the map is cold."""
    n_i, n_j = 60, 40
    affine = np.diag([-0.25, -0.5, 1.0, 1.0])  # columns 0.25 mm, rows 0.5 mm: 15 x 20 mm
    ii, jj = np.meshgrid(np.arange(n_i), np.arange(n_j), indexing="ij")
    peak = (45, 8)
    sal = np.exp(-((ii - peak[0]) ** 2 + (jj - peak[1]) ** 2) / 20.0).astype(np.float32)
    image = np.where(jj > n_j // 2, 1.0, 0.0).astype(np.float32)  # lower half bright
    saliency = Volume(array=sal[:, :, None], affine=affine, modality="DX")
    source = Volume(array=image[:, :, None], affine=affine, modality="DX")
    written = write_explanation(Explanation(saliency={"xray": saliency}), tmp_path, "st-p",
                                images={"xray": source})
    _assert_planar_panel(written["xray.png"], saliency, (384, 512))
    rgb = _png(written["xray.png"])
    hot = _hot(rgb) > 0.15
    ys, xs = np.nonzero(hot)
    # the hot spot's centre is the peak's place: 45.5/60 across, 8.5/40 down
    assert abs(xs.mean() / rgb.shape[1] - 45.5 / 60) < 0.03
    assert abs(ys.mean() / rgb.shape[0] - 8.5 / 40) < 0.03
    # away from the peak the gray radiograph shows: bright lower half, dark upper half
    lower = _at(rgb, (n_i, n_j), (5, 35)).mean()
    upper = _at(rgb, (n_i, n_j), (30, 15)).mean()
    assert lower > upper + 0.2


def test_3d_pngs_keep_the_axial_montage(sample_outputs) -> None:
    _, _, written = sample_outputs
    for role in ("ct", "mr"):
        rgb = _png(written[f"{role}.png"])
        # several axial panels side by side: much wider than high
        assert rgb.shape[1] > 2 * rgb.shape[0] > 100
