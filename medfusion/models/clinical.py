"""Clinical record preprocessing: a scikit-learn ColumnTransformer fitted on the training split.

Numeric variables: median imputation with a missing-value indicator (``SimpleImputer(
add_indicator=True)``), then ``StandardScaler`` over the imputed values and the indicators.
Categorical variables: ``OneHotEncoder(handle_unknown="ignore")`` where a missing value is
its own category (``__missing__``, always present) and an unseen value encodes as all zeros.

The fitted parameters (medians, which variables got an indicator, means, scales, category
lists) are exported by :meth:`ClinicalPreprocessor.to_dict` as plain JSON. A preprocessor
restored with :meth:`ClinicalPreprocessor.from_dict` applies those parameters with numpy,
reproducing the fitted scikit-learn transformer (checked to 1e-6 in the tests), without
pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion.errors import ClinicalSchemaError

# The one missing-value vocabulary (also used by the CSV reader and the manifest): a cell the
# reader calls missing must be imputed here, never parsed as a value.
from medfusion.missing import is_missing as _is_missing

MISSING = "__missing__"
_TYPES = ("numeric", "categorical")


def _to_float(name: str, value: Any) -> float:
    if _is_missing(value):
        return float("nan")
    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ClinicalSchemaError(
            f"clinical variable {name!r} is numeric but got a non-number value; "
            "fix the table or declare the variable categorical"
        ) from None
    if not math.isfinite(x):
        raise ClinicalSchemaError(
            f"clinical variable {name!r} has an infinite value; leave it empty if unknown"
        )
    return x


def _to_category(value: Any) -> str:
    if _is_missing(value):
        return MISSING
    if isinstance(value, float) and value.is_integer():
        # 1.0 from a float column and "1" from a CSV are the same category.
        return str(int(value))
    return str(value).strip()


def _as_float_array(x: Any) -> np.ndarray:
    """FunctionTransformer step: the numeric block arrives as an object array."""
    return np.asarray(x, dtype=np.float64)


class ClinicalPreprocessor:
    """Turns clinical records (mappings of variable -> value) into a float32 matrix.

    ``schema`` maps each variable to ``{"type": "numeric" | "categorical", ...}``; a
    categorical entry may list ``"categories"`` to fix the one-hot columns in advance.
    Other keys are ignored here (the CSV validation in ``medfusion.io.clinical`` uses them).
    """

    def __init__(self, schema: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(schema, Mapping):
            raise ClinicalSchemaError("the clinical schema must map variable names to settings")
        clean: dict[str, dict[str, Any]] = {}
        for name, spec in schema.items():
            if not isinstance(name, str) or not name:
                raise ClinicalSchemaError(f"clinical variable names must be strings, got {name!r}")
            if not isinstance(spec, Mapping) or spec.get("type") not in _TYPES:
                raise ClinicalSchemaError(
                    f"clinical variable {name!r} needs type numeric or categorical"
                )
            clean[name] = dict(spec)
        self.schema = clean
        self.numeric = [n for n, s in clean.items() if s["type"] == "numeric"]
        self.categorical = [n for n, s in clean.items() if s["type"] == "categorical"]
        self._ct: Any = None  # the fitted scikit-learn ColumnTransformer
        self._params: dict[str, Any] | None = None

    # -- fitting ---------------------------------------------------------------------------
    def _matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
            raise ClinicalSchemaError("clinical rows must be a sequence of mappings")
        out = np.empty((len(rows), len(self.numeric) + len(self.categorical)), dtype=object)
        for r, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ClinicalSchemaError(f"clinical row {r} is not a mapping")
            for c, name in enumerate(self.numeric):
                out[r, c] = _to_float(name, row.get(name))
            for c, name in enumerate(self.categorical, start=len(self.numeric)):
                out[r, c] = _to_category(row.get(name))
        return out

    def fit(self, rows: Sequence[Mapping[str, Any]]) -> ClinicalPreprocessor:
        """Fit imputation, scaling and one-hot categories on the training rows."""
        from sklearn.compose import ColumnTransformer
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

        x = self._matrix(rows)
        if len(x) == 0:
            raise ClinicalSchemaError("cannot fit clinical preprocessing on zero rows")
        n_num = len(self.numeric)
        categories = []
        for c, name in enumerate(self.categorical):
            declared = [_to_category(v) for v in self.schema[name].get("categories", []) or []]
            seen = {str(v) for v in x[:, n_num + c]}
            cats = sorted((set(declared) | seen) - {MISSING})
            categories.append([*cats, MISSING])
        transformers = []
        if self.numeric:
            transformers.append(
                (
                    "num",
                    Pipeline(
                        [
                            ("float", FunctionTransformer(_as_float_array)),
                            (
                                "impute",
                                SimpleImputer(
                                    strategy="median", add_indicator=True, keep_empty_features=True
                                ),
                            ),
                            ("scale", StandardScaler()),
                        ]
                    ),
                    list(range(n_num)),
                )
            )
        if self.categorical:
            transformers.append(
                (
                    "cat",
                    OneHotEncoder(
                        categories=categories, handle_unknown="ignore", sparse_output=False
                    ),
                    list(range(n_num, n_num + len(self.categorical))),
                )
            )
        if not transformers:
            self._params = self._export(None, [])
            return self
        ct = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)
        ct.fit(x)
        self._ct = ct
        self._params = self._export(ct, categories)
        return self

    def _export(self, ct: Any, categories: list[list[str]]) -> dict[str, Any]:
        params: dict[str, Any] = {
            "version": 1,
            "schema": self.schema,
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "impute": [],
            "indicator": [],
            "mean": [],
            "scale": [],
            "categories": categories,
        }
        names: list[str] = []
        if ct is not None and self.numeric:
            pipe = ct.named_transformers_["num"]
            imputer, scaler = pipe.named_steps["impute"], pipe.named_steps["scale"]
            params["impute"] = [float(v) for v in imputer.statistics_]
            ind = imputer.indicator_.features_ if imputer.indicator_ is not None else []
            params["indicator"] = [int(i) for i in ind]
            params["mean"] = [float(v) for v in scaler.mean_]
            params["scale"] = [float(v) for v in scaler.scale_]
            names += list(self.numeric)
            names += [f"{self.numeric[i]}_missing" for i in params["indicator"]]
        for name, cats in zip(self.categorical, categories, strict=True):
            names += [f"{name}={c}" for c in cats]
        params["feature_names"] = names
        return params

    # -- applying --------------------------------------------------------------------------
    def _require_fitted(self) -> dict[str, Any]:
        if self._params is None:
            raise ClinicalSchemaError("the clinical preprocessor is not fitted; call fit first")
        return self._params

    @property
    def feature_names(self) -> list[str]:
        """Names of the output columns, in order."""
        return list(self._require_fitted()["feature_names"])

    @property
    def n_features(self) -> int:
        return len(self._require_fitted()["feature_names"])

    def transform(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(N, n_features) float32. Unknown variables in a row are ignored; absent ones are
        missing."""
        params = self._require_fitted()
        x = self._matrix(rows)
        if self.n_features == 0:
            return np.zeros((len(x), 0), dtype=np.float32)
        if len(x) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        if self._ct is not None:
            return np.asarray(self._ct.transform(x), dtype=np.float32)
        return self._transform_numpy(x, params)

    def _transform_numpy(self, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        n_num = len(self.numeric)
        blocks: list[np.ndarray] = []
        if n_num:
            num = x[:, :n_num].astype(np.float64)
            missing = np.isnan(num)
            imputed = np.where(missing, np.asarray(params["impute"], dtype=np.float64), num)
            ind = missing[:, params["indicator"]].astype(np.float64)
            full = np.concatenate([imputed, ind], axis=1)
            blocks.append(
                (full - np.asarray(params["mean"])) / np.asarray(params["scale"], dtype=np.float64)
            )
        for c, cats in enumerate(params["categories"]):
            col = x[:, n_num + c]
            lookup = {v: i for i, v in enumerate(cats)}
            onehot = np.zeros((len(x), len(cats)), dtype=np.float64)
            for r, v in enumerate(col):
                j = lookup.get(v)
                if j is not None:
                    onehot[r, j] = 1.0
            blocks.append(onehot)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fitted parameters as JSON-able data (for the model card)."""
        import copy

        return copy.deepcopy(self._require_fitted())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClinicalPreprocessor:
        """Restore a fitted preprocessor from :meth:`to_dict` output (numpy, no pickle).

        The schema's column order is taken from the stored ``numeric`` / ``categorical``
        lists, not from the mapping: a JSON card written with sorted keys reorders the
        mapping, and the feature layout must stay the one the model was fitted with.
        """
        try:
            schema = d["schema"]
            order = [*d.get("numeric", []), *d.get("categorical", [])]
            fitted = {k: schema[k] for k in order if k in schema}
            fitted.update({k: v for k, v in schema.items() if k not in fitted})
            obj = cls(fitted)
            params = {k: d[k] for k in ("numeric", "categorical", "impute", "indicator",
                                         "mean", "scale", "categories", "feature_names")}
        except (KeyError, TypeError) as error:
            raise ClinicalSchemaError(
                f"stored clinical preprocessing is incomplete ({error}); re-train the model"
            ) from None
        n_num, n_ind = len(obj.numeric), len(params["indicator"])
        ok = (
            list(params["numeric"]) == obj.numeric
            and list(params["categorical"]) == obj.categorical
            and (n_num == 0 or len(params["impute"]) == n_num)
            and (n_num == 0 or len(params["mean"]) == len(params["scale"]) == n_num + n_ind)
            and len(params["categories"]) == len(obj.categorical)
            and all(0 <= int(i) < n_num for i in params["indicator"])
        )
        if not ok:
            raise ClinicalSchemaError(
                "stored clinical preprocessing does not match its schema; re-train the model"
            )
        obj._params = {"version": int(d.get("version", 1)), "schema": obj.schema, **params}
        return obj


def clinical_present(record: Mapping[str, Any] | None, columns: Sequence[str]) -> bool:
    """The clinical branch counts as present when any of ``columns`` has a value (the
    record as validated: missing cells are None)."""
    if not record:
        return False
    return any(record.get(c) is not None for c in columns)
