"""FusionModel.predict carries calibrated/raw probabilities, MC-dropout uncertainty,
conformal sets with alpha at prediction time, and modality Shapley values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfusion.inference as fm
from medfusion.explain.benchmark import lesion_cohort, study_inputs, train_lesion_model
from medfusion.uncertainty import ConformalPredictor, TemperatureScaler

GRID = (16, 16, 16)


def _prepared(study, key: str):
    return fm.PreparedInputs(
        study_key=key, modalities=("ct", "clinical"), tensors={"ct": study.tensor},
        present=np.array([True, True]), clinical=study.clinical,
    )


@pytest.fixture(scope="module")
def model_and_studies():
    from medfusion.preprocess import RoleSpec

    net = train_lesion_model(lesion_cohort(64, seed=0, grid=GRID), epochs=15)
    val = lesion_cohort(40, seed=4, grid=GRID)
    with torch.no_grad():
        logits = torch.cat([net(*study_inputs(s)).logits for s in val]).numpy()
    y = np.array([s.label for s in val])
    scaler = TemperatureScaler().fit(logits, y)
    conformal = ConformalPredictor("aps").fit(scaler.transform(logits), y)
    card = {"labels": ["normal", "lesion"], "net": net.config.to_dict(),
            "role_specs": {"ct": RoleSpec(grid=GRID, normalization="none").to_dict()},
            "members": [{"prefix": "m0."}],
            "calibration": {"temperature": scaler.to_dict(), "conformal": conformal.to_dict()},
            "training": {"splits": {"train": {"labels": {"normal": 24, "lesion": 24}}}}}
    model = fm.FusionModel.from_parts(card, {f"m0.{k}": v for k, v in net.state_dict().items()})
    return model, lesion_cohort(8, seed=5, grid=GRID)


def test_prediction_carries_every_trust_number(model_and_studies) -> None:
    model, studies = model_and_studies
    preds = model.predict_prepared([_prepared(s, f"st-{i}") for i, s in enumerate(studies)])
    for pred, s in zip(preds, studies, strict=True):
        assert pred.mutual_info is not None and pred.mutual_info >= 0
        assert pred.prob_std is not None and 0 <= pred.prob_std <= 0.5
        assert pred.entropy is not None and 0 <= pred.entropy <= np.log(2) + 1e-9
        assert pred.prediction_set is not None
        assert pred.abstain == (len(pred.prediction_set) != 1)
        assert set(pred.shapley) == {"ct", "clinical"}
        # efficiency: the values add up to p(lesion) minus the training base rate (1/2)
        p_net = torch.softmax(model.net(*study_inputs(s)).logits.double()
                              / model.temperature.temperature, 1)[0, 1].item()
        assert sum(pred.shapley.values()) == pytest.approx(p_net - 0.5, abs=1e-5)
        assert pred.probabilities["lesion"] == pytest.approx(p_net, abs=1e-5)
        # temperature never changes the predicted class
        raw_top = max(pred.raw_probabilities, key=pred.raw_probabilities.get)
        assert pred.predicted == raw_top


def test_numbers_do_not_depend_on_the_batch(model_and_studies) -> None:
    model, studies = model_and_studies
    batch = model.predict_prepared([_prepared(s, f"st-{i}") for i, s in enumerate(studies)])
    alone = model.predict_prepared([_prepared(studies[5], "st-5")])[0]
    assert alone.mutual_info == batch[5].mutual_info
    assert alone.prob_std == batch[5].prob_std
    assert alone.shapley == batch[5].shapley


def test_alpha_is_chosen_at_prediction_time(model_and_studies) -> None:
    model, studies = model_and_studies
    batch = [_prepared(s, f"st-{i}") for i, s in enumerate(studies)]
    wide = model.predict_prepared(batch, alpha=0.02)
    narrow = model.predict_prepared(batch, alpha=0.5)
    assert all(set(n.prediction_set) <= set(w.prediction_set) for n, w in
               zip(narrow, wide, strict=True))
    assert sum(len(w.prediction_set) for w in wide) > sum(len(n.prediction_set) for n in narrow)


def _ood_inputs(studies, kind: str):
    """Out-of-distribution versions of held-out studies: pure noise, or a different
    'modality' (a smooth, bright, lesion-free field with another intensity scale)."""
    rng = np.random.default_rng(11)
    out = []
    for i, s in enumerate(studies):
        if kind == "noise":
            t = rng.normal(0.0, 1.0, size=s.tensor.shape).astype(np.float32)
        else:
            grid = np.indices(GRID).sum(axis=0, dtype=np.float32)[None]
            t = (3.0 + np.sin(grid / 4.0 + i)).astype(np.float32)
        out.append(fm.PreparedInputs(
            study_key=f"st-{kind}-{i}", modalities=("ct", "clinical"), tensors={"ct": t},
            present=np.array([True, True]), clinical=s.clinical))
    return out


@pytest.mark.parametrize("kind", ["noise", "wrong_modality"])
def test_uncertainty_is_higher_out_of_distribution(model_and_studies, kind: str) -> None:
    model, studies = model_and_studies
    held_out = model.predict_prepared([_prepared(s, f"st-{i}") for i, s in enumerate(studies)])
    ood = model.predict_prepared(_ood_inputs(studies, kind))
    shift_in = np.array([p.feature_shift for p in held_out])
    shift_out = np.array([p.feature_shift for p in ood])
    # the feature-statistics shift separates every OOD study from every held-out one
    assert shift_out.min() > shift_in.max(), (shift_in, shift_out)
    assert all("OUT_OF_DISTRIBUTION" in p.flags for p in ood)
    # (this benchmark varies each study's global intensity on purpose, so held-out studies
    # reach ~0.5 here and some are flagged too; see docs/trust.md for the measured
    # public-trainer numbers: held-out <= 0.03)
    # and the MC-dropout numbers rise on average too
    mi_in = np.mean([p.mutual_info for p in held_out])
    mi_out = np.mean([p.mutual_info for p in ood])
    h_in = np.mean([p.entropy for p in held_out])
    h_out = np.mean([p.entropy for p in ood])
    # measured: noise MI 0.028 -> 0.089, entropy 0.020 -> 0.268; wrong modality MI -> 0.097,
    # entropy -> 0.312
    assert mi_out > mi_in and h_out > h_in, (mi_in, mi_out, h_in, h_out)
