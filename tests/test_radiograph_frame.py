"""A radiograph's affine is the frame ITK/GDCM give the same file (viewer overlays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion import load_volume
from medfusion.testing import write_radiograph


def _itk_ras(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("extra", [
    {},
    {"ImageOrientationPatient": [1, 0, 0, 0, 0, -1], "ImagePositionPatient": [10, -20, 30]},
    {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1], "ImagePositionPatient": [-5, 0, 2.5]},
])
@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_radiograph_affine_is_itks(tmp_path: Path, modality: str, extra: dict) -> None:
    # ImagerPixelSpacing = PixelSpacing: GDCM reads only the former for CR/DX
    path = write_radiograph(tmp_path / "x.dcm", np.full((30, 20), 100, np.uint16),
                            modality=modality, pixel_spacing=(0.4, 0.3),
                            imager_pixel_spacing=(0.4, 0.3), **extra)
    volume = load_volume(path)
    assert volume.spatial_shape == (30, 20, 1)
    np.testing.assert_allclose(volume.affine, _itk_ras(path), atol=1e-6)
