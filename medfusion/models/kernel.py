"""Kernel-level fusion: one RBF kernel per modality on learned embeddings, combined with
learned weights into a precomputed-kernel SVM.

For samples a, b with presence masks p_a, p_b and modality weights w_m >= 0 (sum 1)::

    K(a, b) = sum_m w_m p_a[m] p_b[m] k_m(a_m, b_m) / sqrt(W(a) W(b)),   W(a) = sum_m w_m p_a[m]

A modality contributes only where both samples have it, and the weights are renormalised
over what is present: two samples with the same modalities get exactly the weighted mean of
their shared kernels. Normalising by sqrt(W(a) W(b)) (rather than by the weight of the shared
modalities) keeps K positive semi-definite, so the SVM problem stays convex; K(a, a) = 1.

``k_m(x, y) = exp(-gamma_m ||x - y||^2)``; ``gamma="scale"`` gives 1 / (E * var) of that
modality's training embeddings, as in scikit-learn. The weights come from centred
kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012) of each k_m with the label
kernel on the pairs where the modality is present; negative alignments are clipped to 0.

Persistence: :meth:`KernelFusionClassifier.state` stores the training embeddings, masks and
labels plus the parameters; :meth:`from_state` refits the SVM from them. libsvm is
deterministic for a given ``random_state``, so the refit model is the fitted one exactly
(checked in the tests), and nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medfusion.errors import ModalityMismatchError, ModelPackageError, RecipeError


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _centre(k: np.ndarray) -> np.ndarray:
    """H K H with H = I - 11^T / n, in O(n^2) instead of two n^3 products."""
    return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


class KernelFusionClassifier:
    """Multiple-kernel SVM over per-modality embeddings (see the module docstring)."""

    def __init__(self, gamma: float | str = "scale", C: float = 1.0, seed: int = 0) -> None:
        self.gamma = gamma
        self.C = C
        self.seed = seed

    # -- kernel ----------------------------------------------------------------------------
    @staticmethod
    def _check(embeddings: Any, present: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(embeddings, dtype=np.float64)
        p = np.asarray(present, dtype=bool)
        if x.ndim != 3 or p.shape != x.shape[:2]:
            raise ModalityMismatchError(
                f"embeddings must be (N, M, E) with present (N, M), got {x.shape} and {p.shape}"
            )
        if not np.isfinite(x).all():
            raise ModalityMismatchError("embeddings contain NaN or Inf")
        if len(p) and not p.any(axis=1).all():
            raise ModalityMismatchError("a sample has no modality present")
        return x, p

    def _modality_kernels(
        self, xa: np.ndarray, pa: np.ndarray, xb: np.ndarray, pb: np.ndarray
    ) -> np.ndarray:
        """(M, Na, Nb) RBF kernels, zero where either sample lacks the modality."""
        m = xa.shape[1]
        out = np.zeros((m, len(xa), len(xb)))
        for i in range(m):
            k = np.exp(-self.gammas_[i] * _sq_dists(xa[:, i], xb[:, i]))
            out[i] = k * np.outer(pa[:, i], pb[:, i])
        return out

    def _combine(
        self, kernels: np.ndarray, pa: np.ndarray, pb: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        num = np.tensordot(weights, kernels, axes=1)
        wa = np.maximum(pa @ weights, 1e-12)
        wb = np.maximum(pb @ weights, 1e-12)
        return num / np.sqrt(np.outer(wa, wb))

    # -- estimator -------------------------------------------------------------------------
    def fit(self, embeddings: Any, present: Any, y: Any) -> KernelFusionClassifier:
        """Learn per-modality gammas and weights, then the SVM. ``y``: integer labels."""
        from sklearn.svm import SVC

        x, p = self._check(embeddings, present)
        labels = np.asarray(y).astype(np.int64).ravel()
        if len(labels) != len(x):
            raise ModalityMismatchError(f"{len(x)} samples but {len(labels)} labels")
        if len(np.unique(labels)) < 2:
            raise ModalityMismatchError("kernel fusion needs at least two classes in training")
        m, e = x.shape[1], x.shape[2]
        gammas = []
        for i in range(m):
            xi = x[p[:, i], i]
            if isinstance(self.gamma, str):
                if self.gamma != "scale":
                    raise RecipeError(f"gamma must be a number or 'scale', got {self.gamma!r}")
                var = float(xi.var()) if len(xi) > 1 else 0.0
                gammas.append(1.0 / (e * var) if var > 0 else 1.0 / e)
            else:
                gammas.append(float(self.gamma))
        self.gammas_ = np.asarray(gammas)
        kernels = self._modality_kernels(x, p, x, p)
        self.weights_ = self._alignment_weights(kernels, p, labels)
        gram = self._combine(kernels, p, p, self.weights_)
        self.svc_ = SVC(kernel="precomputed", C=self.C, random_state=self.seed).fit(gram, labels)
        self.classes_ = self.svc_.classes_
        self.calibrator_ = self._fit_platt(gram, labels)
        self.train_embeddings_, self.train_present_, self.train_labels_ = x, p, labels
        return self

    def _decision(self, svc: Any, gram: np.ndarray) -> np.ndarray:
        d = svc.decision_function(gram)
        return d.reshape(len(gram), -1)

    def _fit_platt(self, gram: np.ndarray, labels: np.ndarray) -> Any:
        """Platt scaling on out-of-fold SVM decision values (what ``SVC(probability=True)``
        does inside libsvm; done here because that option is deprecated in scikit-learn
        1.9). Falls back to in-sample values when a class has fewer than 2 samples."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import SVC

        counts = np.bincount(np.searchsorted(self.classes_, labels))
        n_splits = int(min(5, counts.min()))
        if n_splits >= 2:
            folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
            dec = np.zeros((len(labels), 1 if len(self.classes_) == 2 else len(self.classes_)))
            for tr, va in folds.split(gram, labels):
                svc = SVC(kernel="precomputed", C=self.C, random_state=self.seed)
                svc.fit(gram[np.ix_(tr, tr)], labels[tr])
                if len(svc.classes_) != len(self.classes_):  # pragma: no cover - stratified
                    dec[va] = self._decision(self.svc_, gram[va])
                else:
                    dec[va] = self._decision(svc, gram[np.ix_(va, tr)])
        else:
            dec = self._decision(self.svc_, gram)
        return LogisticRegression(C=1e3, max_iter=1000).fit(dec, labels)

    @staticmethod
    def _alignment_weights(kernels: np.ndarray, p: np.ndarray, labels: np.ndarray) -> np.ndarray:
        classes = np.unique(labels)
        onehot = (labels[:, None] == classes[None, :]).astype(np.float64)
        m = kernels.shape[0]
        align = np.zeros(m)
        for i in range(m):
            rows = p[:, i]
            if rows.sum() < 2:
                continue
            k = kernels[i][np.ix_(rows, rows)]
            yk = onehot[rows] @ onehot[rows].T
            kc, yc = _centre(k), _centre(yk)
            denom = np.linalg.norm(kc) * np.linalg.norm(yc)
            align[i] = float((kc * yc).sum() / denom) if denom > 0 else 0.0
        w = np.clip(align, 0.0, None)
        return w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)

    def _require_fitted(self) -> None:
        if not hasattr(self, "calibrator_"):
            raise ModelPackageError("the kernel fusion classifier is not fitted; call fit first")

    def decision_gram(self, embeddings: Any, present: Any) -> np.ndarray:
        """The combined kernel between new samples and the training samples (N, N_train)."""
        self._require_fitted()
        x, p = self._check(embeddings, present)
        if x.shape[1:] != self.train_embeddings_.shape[1:]:
            raise ModalityMismatchError(
                f"embeddings must be (N, {self.train_embeddings_.shape[1]}, "
                f"{self.train_embeddings_.shape[2]}), got {x.shape}"
            )
        kernels = self._modality_kernels(x, p, self.train_embeddings_, self.train_present_)
        return self._combine(kernels, p, self.train_present_, self.weights_)

    def predict_proba(self, embeddings: Any, present: Any) -> np.ndarray:
        """(N, n_classes) probabilities, columns in the order of ``classes_``."""
        gram = self.decision_gram(embeddings, present)
        return self.calibrator_.predict_proba(self._decision(self.svc_, gram))

    def predict(self, embeddings: Any, present: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(embeddings, present).argmax(1)]

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able parameters, arrays) from which :meth:`from_state` rebuilds this model."""
        self._require_fitted()
        meta = {
            "kind": "kernel_svm",
            "version": 1,
            "gamma": self.gamma,
            "C": float(self.C),
            "seed": int(self.seed),
            "gammas": [float(g) for g in self.gammas_],
            "weights": [float(w) for w in self.weights_],
            "classes": [int(c) for c in self.classes_],
        }
        arrays = {
            "train_embeddings": self.train_embeddings_.astype(np.float64),
            "train_present": self.train_present_.astype(np.uint8),
            "train_labels": self.train_labels_.astype(np.int64),
        }
        return meta, arrays

    @classmethod
    def from_state(
        cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> KernelFusionClassifier:
        """Rebuild by refitting on the stored training embeddings (deterministic, exact)."""
        try:
            obj = cls(gamma=meta["gamma"], C=float(meta["C"]), seed=int(meta["seed"]))
            x = np.asarray(arrays["train_embeddings"], dtype=np.float64)
            p = np.asarray(arrays["train_present"]).astype(bool)
            y = np.asarray(arrays["train_labels"]).astype(np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelPackageError(
                f"stored kernel fusion state is incomplete ({error}); re-train the model"
            ) from None
        obj.fit(x, p, y)
        stored = np.asarray(meta.get("weights", obj.weights_), dtype=np.float64)
        if stored.shape != obj.weights_.shape or not np.allclose(stored, obj.weights_, atol=1e-9):
            raise ModelPackageError(
                "kernel fusion state does not reproduce its stored weights; re-train the model"
            )
        return obj
