"""Kernel-level fusion: per-modality RBF kernels, learned weights, precomputed-kernel SVM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfusion.errors import MedfusionError, ModalityMismatchError
from medfusion.models.kernel import KernelFusionClassifier


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modality 0 carries the label, modality 1 is noise; some modalities are missing."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 2, 6))
    x[:, 0, :2] += (2 * y[:, None] - 1) * 1.5
    present = rng.random((n, 2)) > 0.25
    present[~present.any(1), 0] = True
    return x, present, y


def test_learns_weights_toward_the_informative_modality_and_predicts() -> None:
    x, p, y = _data(120, 0)
    xt, pt, yt = _data(80, 1)
    pt[:, 0] = True  # test where the informative modality is there
    clf = KernelFusionClassifier(seed=0).fit(x, p, y)
    assert clf.weights_[0] > clf.weights_[1]
    assert clf.weights_.sum() == pytest.approx(1.0)
    proba = clf.predict_proba(xt, pt)
    assert proba.shape == (80, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert roc_auc_score(yt, proba[:, 1]) > 0.9
    assert set(clf.predict(xt, pt)) <= {0, 1}


def test_combined_kernel_is_psd_unit_diagonal_and_renormalised() -> None:
    x, p, y = _data(60, 2)
    clf = KernelFusionClassifier().fit(x, p, y)
    gram = clf.decision_gram(x, p)
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)
    assert np.linalg.eigvalsh((gram + gram.T) / 2).min() > -1e-8
    # Two samples with the same modalities: the weighted mean of their shared kernels.
    both = np.flatnonzero(p.all(1))[:2]
    a, b = both
    k = [np.exp(-clf.gammas_[m] * ((x[a, m] - x[b, m]) ** 2).sum()) for m in range(2)]
    assert gram[a, b] == pytest.approx(float(np.dot(clf.weights_, k)))
    # No shared modality: no similarity.
    only0, only1 = np.flatnonzero(p[:, 0] & ~p[:, 1]), np.flatnonzero(p[:, 1] & ~p[:, 0])
    if len(only0) and len(only1):
        assert gram[only0[0], only1[0]] == 0.0


def test_missing_modalities_at_prediction_time() -> None:
    x, p, y = _data(100, 3)
    clf = KernelFusionClassifier().fit(x, p, y)
    for present in ([True, False], [False, True], [True, True]):
        mask = np.tile(present, (10, 1))
        proba = clf.predict_proba(x[:10], mask)
        assert np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    with pytest.raises(ModalityMismatchError):
        clf.predict_proba(x[:2], np.zeros((2, 2), bool))


def test_state_round_trip_is_exact_and_json_safe() -> None:
    x, p, y = _data(80, 4)
    clf = KernelFusionClassifier(C=2.0, seed=7).fit(x, p, y)
    meta, arrays = clf.state()
    meta = json.loads(json.dumps(meta))
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    again = KernelFusionClassifier.from_state(meta, arrays)
    np.testing.assert_array_equal(again.predict_proba(x, p), clf.predict_proba(x, p))


def test_deterministic_for_a_seed() -> None:
    x, p, y = _data(80, 5)
    a = KernelFusionClassifier(seed=3).fit(x, p, y).predict_proba(x, p)
    b = KernelFusionClassifier(seed=3).fit(x, p, y).predict_proba(x, p)
    np.testing.assert_array_equal(a, b)


def test_multiclass() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(size=(90, 1, 4))
    x[:, 0, 0] += 3 * y
    clf = KernelFusionClassifier().fit(x, np.ones((90, 1), bool), y)
    proba = clf.predict_proba(x, np.ones((90, 1), bool))
    assert proba.shape == (90, 3) and (proba.argmax(1) == y).mean() > 0.9


def test_bad_inputs_are_refused() -> None:
    x, p, y = _data(20, 6)
    with pytest.raises(ModalityMismatchError):
        KernelFusionClassifier().fit(x[:, 0], p, y)
    with pytest.raises(ModalityMismatchError):
        KernelFusionClassifier().fit(x, p, np.zeros(20))
    with pytest.raises(MedfusionError):
        KernelFusionClassifier(gamma="auto").fit(x, p, y)
    with pytest.raises(MedfusionError):
        KernelFusionClassifier().predict_proba(x, p)
    clf = KernelFusionClassifier().fit(x, p, y)
    with pytest.raises(ModalityMismatchError):
        clf.predict_proba(x[:, :, :3], p)
    meta, arrays = clf.state()
    with pytest.raises(MedfusionError):
        KernelFusionClassifier.from_state(meta, {"train_labels": arrays["train_labels"]})


def test_state_survives_a_model_package(tmp_path) -> None:
    """The way training stores it: meta in the JSON card, arrays in the safetensors file."""
    import torch

    from medfusion.models.package import load_package, save_package

    x, p, y = _data(60, 8)
    clf = KernelFusionClassifier(seed=1).fit(x, p, y)
    meta, arrays = clf.state()
    save_package(
        tmp_path / "m",
        card={"kernel": meta},
        tensors={f"kernel.{k}": torch.from_numpy(v) for k, v in arrays.items()},
    )
    card, tensors = load_package(tmp_path / "m")
    restored = KernelFusionClassifier.from_state(
        card["kernel"], {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items()}
    )
    np.testing.assert_array_equal(restored.predict_proba(x, p), clf.predict_proba(x, p))
