"""Clinical preprocessing: fitted on training rows, exported as JSON, restored without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfusion.errors import ClinicalSchemaError
from medfusion.models.clinical import ClinicalPreprocessor

SCHEMA = {
    "age": {"type": "numeric", "unit": "years"},
    "sex": {"type": "categorical"},
    "bmi": {"type": "numeric"},
    "stage": {"type": "categorical", "categories": ["I", "II", "III"]},
}
TRAIN = [
    {"age": 63, "sex": "F", "bmi": "", "stage": "I"},
    {"age": "50", "sex": "M", "bmi": 22.5, "stage": "II"},
    {"age": None, "sex": None, "bmi": 30, "stage": "II"},
    {"age": 70.0, "sex": "F", "bmi": 25, "stage": None},
    {"age": 41, "sex": "M", "bmi": float("nan")},
]
NEW = [
    {"age": 80, "sex": "X", "bmi": 27, "stage": "IV"},  # unseen categories
    {"sex": "F"},  # every numeric missing
    {"age": "55", "sex": "M", "bmi": "31.5", "stage": "III", "other": "ignored"},
]


def test_restored_preprocessor_matches_the_fitted_one() -> None:
    fitted = ClinicalPreprocessor(SCHEMA).fit(TRAIN)
    stored = json.loads(json.dumps(fitted.to_dict()))  # must survive plain JSON
    restored = ClinicalPreprocessor.from_dict(stored)
    for rows in (TRAIN, NEW):
        a, b = fitted.transform(rows), restored.transform(rows)
        assert a.dtype == np.float32 and a.shape == (len(rows), fitted.n_features)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert restored.feature_names == fitted.feature_names


def test_features_are_imputed_indicated_scaled_and_one_hot() -> None:
    pre = ClinicalPreprocessor(SCHEMA).fit(TRAIN)
    names = pre.feature_names
    assert names[:4] == ["age", "bmi", "age_missing", "bmi_missing"]
    assert "sex=__missing__" in names and "stage=III" in names  # declared, never seen
    x = pre.transform(TRAIN)
    # Scaled on the training rows: zero mean, unit variance per numeric column.
    np.testing.assert_allclose(x[:, :2].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(x[:, :2].std(0), 1, atol=1e-5)
    # Missing values get the indicator; the indicator differs between present and missing.
    age_missing = x[:, names.index("age_missing")]
    assert age_missing[2] > age_missing[0] and age_missing[0] == age_missing[1]
    # Missing categorical is its own category; unseen categories encode as all zeros.
    sex = [names.index(f"sex={v}") for v in ("F", "M", "__missing__")]
    assert x[2, sex].tolist() == [0, 0, 1]
    new = pre.transform(NEW)
    assert new[0, sex].tolist() == [0, 0, 0]
    stage = [i for i, n in enumerate(names) if n.startswith("stage=")]
    assert new[0, stage].sum() == 0 and new[2, names.index("stage=III")] == 1


def test_median_imputation_uses_training_values() -> None:
    pre = ClinicalPreprocessor({"age": {"type": "numeric"}}).fit(
        [{"age": 10}, {"age": 20}, {"age": 90}, {"age": None}]
    )
    d = pre.to_dict()
    assert d["impute"] == [20.0]
    assert pre.transform([{"age": None}])[0, 0] == pytest.approx(pre.transform([{"age": 20}])[0, 0])


def test_all_missing_numeric_column_is_kept() -> None:
    pre = ClinicalPreprocessor({"lab": {"type": "numeric"}, "sex": {"type": "categorical"}})
    pre.fit([{"lab": None, "sex": "F"}, {"lab": "", "sex": "M"}])
    restored = ClinicalPreprocessor.from_dict(pre.to_dict())
    rows = [{"lab": 3.0, "sex": "F"}, {"sex": "M"}]
    np.testing.assert_allclose(pre.transform(rows), restored.transform(rows), atol=1e-6)
    assert np.isfinite(pre.transform(rows)).all()


def test_empty_schema_gives_zero_features() -> None:
    pre = ClinicalPreprocessor({}).fit([{"a": 1}])
    assert pre.n_features == 0 and pre.transform([{}, {}]).shape == (2, 0)


@pytest.mark.parametrize(
    "schema",
    [{"age": {"type": "float"}}, {"age": "numeric"}, {"": {"type": "numeric"}}, ["age"]],
)
def test_bad_schema_is_refused(schema) -> None:
    with pytest.raises(ClinicalSchemaError):
        ClinicalPreprocessor(schema)


def test_bad_values_and_misuse_are_refused() -> None:
    pre = ClinicalPreprocessor(SCHEMA)
    with pytest.raises(ClinicalSchemaError, match="not fitted"):
        pre.transform(TRAIN)
    with pytest.raises(ClinicalSchemaError, match="numeric"):
        pre.fit([{"age": "sixty"}])
    with pytest.raises(ClinicalSchemaError):
        pre.fit([{"age": float("inf")}])
    with pytest.raises(ClinicalSchemaError):
        pre.fit([])
    with pytest.raises(ClinicalSchemaError):
        pre.fit({"age": 1})  # a single mapping, not rows
    fitted = ClinicalPreprocessor(SCHEMA).fit(TRAIN)
    broken = fitted.to_dict()
    broken["mean"] = broken["mean"][:1]
    with pytest.raises(ClinicalSchemaError):
        ClinicalPreprocessor.from_dict(broken)
    with pytest.raises(ClinicalSchemaError):
        ClinicalPreprocessor.from_dict({"schema": SCHEMA})


def test_restored_from_a_sorted_json_card_keeps_the_fitted_column_order() -> None:
    # model.json is written with sort_keys=True: the schema mapping comes back reordered.
    schema = {"weight": {"type": "numeric"}, "sex": {"type": "categorical"},
              "age": {"type": "numeric"}}
    rows = [{"weight": 70.0 + i, "sex": "FM"[i % 2], "age": 30.0 + 3 * i} for i in range(8)]
    fitted = ClinicalPreprocessor(schema).fit(rows)
    card = json.loads(json.dumps(fitted.to_dict(), sort_keys=True))
    assert list(card["schema"]) == ["age", "sex", "weight"]
    restored = ClinicalPreprocessor.from_dict(card)
    assert restored.feature_names == fitted.feature_names
    np.testing.assert_allclose(restored.transform(rows), fitted.transform(rows), atol=1e-6)


def test_none_text_is_missing_like_an_empty_cell() -> None:
    # The same vocabulary as the CSV reader: "None" is imputed, never a category "None".
    fitted = ClinicalPreprocessor(SCHEMA).fit(TRAIN)
    words = fitted.transform([{"age": "None", "sex": " NONE ", "bmi": "none", "stage": "None"}])
    empty = fitted.transform([{"age": "", "sex": "", "bmi": None, "stage": None}])
    np.testing.assert_array_equal(words, empty)
    assert words[0, fitted.feature_names.index("sex=__missing__")] == 1.0
