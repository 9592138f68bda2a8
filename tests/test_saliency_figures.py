"""The 3D saliency figure: slices through the map's peak inside the body, the modality's
window, panels of at least 256 px, a title with the study key and role."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from medfusion.explain.export import (
    CT_WINDOWS,
    PANEL_PX,
    _window,
    figure_peak,
    write_explanation,
)
from medfusion.types import Explanation, Volume


def _ct(shape: tuple[int, int, int] = (48, 40, 20)) -> Volume:
    """Air around a water cylinder (0 HU) along k."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 < (0.3 * shape[1]) ** 2
    arr = np.where(body[..., None], 0.0, -1000.0) * np.ones(shape)
    return Volume(array=arr.astype(np.float32), affine=np.diag([0.8, 0.8, 2.5, 1.0]),
                  modality="CT", meta={"BodyPartExamined": "ABDOMEN"})


def test_peak_is_taken_inside_the_body_and_off_the_edge():
    ct = _ct()
    sal = np.zeros(ct.spatial_shape, np.float32)
    sal[2, 2, 10] = 1.0  # air in the corner: the brightest, never shown
    sal[24, 20, 0] = 0.9  # inside the body but on the first slice (the edge of the FOV)
    sal[26, 18, 12] = 0.7  # inside, away from the edge: this one
    assert figure_peak(sal, ct.array, ct) == (26, 18, 12)
    # no map inside the body at all: the plain peak rather than nothing
    only_air = np.zeros_like(sal)
    only_air[2, 2, 10] = 1.0
    assert figure_peak(only_air, ct.array, ct) == (2, 2, 10)


def test_window_comes_from_the_modality():
    ct = _ct()
    lo, hi, name = _window(ct, ct.array)
    centre, width = CT_WINDOWS["soft tissue"]
    assert (lo, hi) == (centre - width / 2, centre + width / 2) and "soft tissue" in name
    head = ct.replace(meta={"BodyPartExamined": "HEAD"})
    assert "brain" in _window(head, head.array)[2]
    mr = Volume(array=np.random.default_rng(0).gamma(2.0, 100.0, (16, 16, 8)).astype(
        np.float32), affine=np.eye(4), modality="MR")
    lo, hi, name = _window(mr, mr.array)
    assert "percentile" in name and 0 < lo < hi < float(mr.array.max())


def test_figure_panels_are_large_and_titled(tmp_path: Path):
    ct = _ct((96, 80, 12))
    sal = np.zeros(ct.spatial_shape, np.float32)
    sal[40:56, 30:50, 4:8] = 1.0
    written = write_explanation(
        Explanation(saliency={"ct": Volume(array=sal, affine=ct.affine)}), tmp_path,
        "study-1", images={"ct": ct}, study_key="st-0123abcd")
    rgb = mpimg.imread(str(written["ct.png"]))
    assert rgb.shape[0] >= PANEL_PX >= 256
    assert rgb.shape[1] > 3 * PANEL_PX
