"""The input-domain check: a study unlike the training split in physical size, spacing,
slice count, intensities or clinical values is flagged ``INPUT_OUT_OF_RANGE`` and abstains,
whatever the network answers. Uses the bundled demo model (its card holds the domain fitted
on its training split) and inputs made here or read from the real scanner data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import medfusion as mf
from medfusion.testing import synthetic
from medfusion.uncertainty.domain import InputDomain, QuantityRange, volume_quantities

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_samples" / "demo_model"
SAMPLES = REPO / "data_samples" / "studies"
RECORD = {"age": 60, "sex": "F", "smoker": "no", "crp": 5.0}


@pytest.fixture(scope="module")
def model() -> mf.FusionModel:
    return mf.FusionModel.load(DEMO)


def _range_flags(pred: mf.Prediction) -> list[str]:
    return [f for f in pred.flags if f.startswith("INPUT_OUT_OF_RANGE:")]


def test_quantities_are_physical_and_orientation_free() -> None:
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    vol = mf.Volume(np.arange(40 * 20 * 10, dtype=np.float32).reshape(40, 20, 10), affine)
    q = volume_quantities(vol)
    assert [q["extent_mm_0"], q["extent_mm_1"], q["extent_mm_2"]] == [30.0, 20.0, 10.0]
    assert [q["spacing_mm_0"], q["spacing_mm_1"], q["spacing_mm_2"]] == [0.5, 0.5, 3.0]
    assert q["slices"] == 10.0
    assert q["p01"] < q["p50"] < q["p99"]
    # The same grid with the axes permuted has the same extents and spacings.
    permuted = mf.Volume(np.ascontiguousarray(vol.array.transpose(2, 0, 1)),
                         np.diag([3.0, 0.5, 0.5, 1.0]))
    qp = volume_quantities(permuted)
    assert [qp[f"extent_mm_{i}"] for i in range(3)] == [30.0, 20.0, 10.0]


def test_intensity_samples_do_not_depend_on_the_memory_layout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A reoriented volume is a non-contiguous view: its percentiles come from the same
    # subsampled voxels as its contiguous copy (without copying the whole volume first).
    from medfusion.uncertainty import domain

    monkeypatch.setattr(domain, "_MAX_SAMPLES", 1000)
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 100.0, (30, 40, 20)).astype(np.float32)
    view = base.transpose(2, 0, 1)[:, ::-1]
    assert not view.flags.c_contiguous
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    q_view = volume_quantities(mf.Volume(view, affine))
    q_copy = volume_quantities(mf.Volume(np.ascontiguousarray(view), affine))
    assert q_view == q_copy
    # Subsampled: not the percentiles of every voxel.
    assert q_view["p50"] != float(np.percentile(view.astype(np.float64), 50.0))


def test_ranges_widen_by_the_stated_tolerance_and_round_trip() -> None:
    ratio = QuantityRange.fit([10.0, 20.0], ratio=2.0)
    assert ratio is not None and ratio.allowed == (5.0, 40.0)
    assert ratio.contains(39.0) and not ratio.contains(41.0) and not ratio.contains(float("nan"))
    margin = QuantityRange.fit([0.0, 100.0], margin=(0.25, 0.0))
    assert margin is not None and margin.allowed == (-25.0, 125.0)
    assert QuantityRange.fit([]) is None
    domain = InputDomain.fit({"ct": [{"slices": 20.0}, {"slices": 30.0}]},
                             [{"age": 40.0}, {"age": 80.0}, {"age": None}], ["age"])
    again = InputDomain.from_dict(json.loads(json.dumps(domain.to_dict())))
    assert again == domain
    assert again.check_quantities("ct", {"slices": 1.0}) == ["slices"]
    assert again.check_quantities("ct", {"slices": 25.0}) == []
    assert again.check_clinical({"age": 300.0}) == ["INPUT_OUT_OF_RANGE:clinical:age"]
    assert again.check_clinical({"age": None}) == []
    with pytest.raises(ValueError):
        InputDomain.from_dict({**domain.to_dict(), "format": 99})


def test_demo_card_holds_the_domain_and_samples_are_inside_it(model: mf.FusionModel) -> None:
    assert model.input_domain is not None
    assert set(model.input_domain.roles) == {"ct", "mr", "xray"}
    for folder in sorted(SAMPLES.iterdir()):
        pred = model.predict(mf.load_study(folder, clinical=RECORD))
        assert _range_flags(pred) == [], folder.name


def test_a_single_ct_slice_as_the_3d_ct_role_is_flagged_and_abstains(
        model: mf.FusionModel, tmp_path: Path) -> None:
    subject = synthetic.make_subject(seed=3, label=1)
    one_slice = subject.arrays["ct"][:, :, 10:11]
    study = tmp_path / "study"
    synthetic.write_dicom_series(study / "ct", one_slice, subject.affines["ct"], "CT", seed=1)
    pred = model.predict(mf.load_study(study))
    flags = _range_flags(pred)
    assert "INPUT_OUT_OF_RANGE:ct:slices" in flags
    assert "INPUT_OUT_OF_RANGE:ct:extent_mm" in flags
    assert pred.abstain is True
    assert set(pred.prediction_set or ()) == set(model.labels)


def test_a_radiograph_ten_times_larger_is_flagged(model: mf.FusionModel, tmp_path: Path
                                                    ) -> None:
    subject = synthetic.make_subject(seed=4, label=0)
    study = tmp_path / "study"
    study.mkdir()
    synthetic.write_dicom_radiograph(study / "xray.dcm", subject.arrays["xray"], (6.0, 6.0),
                                     seed=2)
    pred = model.predict(mf.load_study(study))
    assert "INPUT_OUT_OF_RANGE:xray:extent_mm" in _range_flags(pred)
    assert "INPUT_OUT_OF_RANGE:xray:spacing_mm" in _range_flags(pred)
    assert pred.abstain is True


def test_a_clinical_value_beyond_the_training_range_is_flagged(model: mf.FusionModel) -> None:
    folder = SAMPLES / "study-000"
    pred = model.predict(mf.load_study(folder, clinical={**RECORD, "age": 250}))
    assert _range_flags(pred) == ["INPUT_OUT_OF_RANGE:clinical:age"]
    assert pred.abstain is True


def test_real_radiograph_and_head_ct_are_flagged(model: mf.FusionModel, shared_data: Path,
                                                 tmp_path: Path) -> None:
    cr = tmp_path / "cr"
    cr.mkdir()
    shutil.copy(shared_data / "dicom" / "wg04" / "REF" / "RG2_UNC.dcm", cr / "xray.dcm")
    pred = model.predict(mf.load_study(cr))
    assert "INPUT_OUT_OF_RANGE:xray:extent_mm" in _range_flags(pred)
    assert pred.abstain is True
    head = tmp_path / "head"
    shutil.copytree(shared_data / "dicom" / "dcm_qa_ct_ge" / "In" / "GE", head / "ct")
    pred = model.predict(mf.load_study(head))
    assert "INPUT_OUT_OF_RANGE:ct:extent_mm" in _range_flags(pred)
    assert pred.abstain is True


def test_a_package_without_a_domain_still_loads_and_predicts(tmp_path: Path) -> None:
    card = json.loads((DEMO / "model.json").read_text(encoding="utf-8"))
    card.pop("input_domain")
    from medfusion.models.package import load_package

    _, tensors = load_package(DEMO)
    model = mf.FusionModel.from_parts(card, tensors)
    assert model.input_domain is None
    pred = model.predict(mf.load_study(SAMPLES / "study-000", clinical=RECORD))
    assert _range_flags(pred) == []


def test_score_writes_the_flag_and_abstains_in_the_table(tmp_path: Path) -> None:
    import csv

    from medfusion.scoring.engine import score_folder

    studies = tmp_path / "studies"
    shutil.copytree(SAMPLES / "study-000", studies / "good")
    subject = synthetic.make_subject(seed=3, label=1)
    synthetic.write_dicom_series(studies / "one_slice" / "ct",
                                 subject.arrays["ct"][:, :, 10:11], subject.affines["ct"], "CT",
                                 seed=1)
    summary = score_folder(studies, DEMO, tmp_path / "out", workers=0, progress=False)
    assert summary.exit_code == 0
    with (tmp_path / "out" / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    flagged = [r for r in rows if "INPUT_OUT_OF_RANGE:ct:slices" in r["flags"]]
    assert len(flagged) == 1 and flagged[0]["abstain"] == "true"
    clean = [r for r in rows if "INPUT_OUT_OF_RANGE" not in r["flags"]]
    assert len(clean) == 1
