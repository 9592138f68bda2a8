"""Clinical records against a declared schema (case E8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion.errors import ClinicalSchemaError
from medfusion.io.clinical import ClinicalSchema, read_clinical_csv, validate_record

SCHEMA = {
    "age": {"type": "numeric", "unit": "years", "range": [0, 120]},
    "weight": {"type": "numeric", "unit": "kg", "range": [1, 400]},
    "sex": {"type": "categorical", "levels": ["F", "M"]},
    "smoker": {"type": "categorical"},
}


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clinical.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_values_missing_tokens_and_unknown_columns(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "study_id,age,weight,sex,smoker,comment\n"
        "s1,63,80.5,F,yes,x\n"
        "s2,,NA,m,NaN,y\n"
        "s3,n/a,70,M,,z\n",
    )
    table = read_clinical_csv(path, SCHEMA)
    assert table["s1"] == {"age": 63.0, "weight": 80.5, "sex": "F", "smoker": "yes"}
    assert table["s2"] == {"age": None, "weight": None, "sex": "M", "smoker": None}
    assert table["s3"]["age"] is None and table["s3"]["smoker"] is None
    codes = {f.code: f.details for f in table.issues}
    assert codes["CLINICAL_UNKNOWN_COLUMNS"]["columns"] == ["comment"]
    assert "comment" not in table["s1"]


def test_header_unit_is_converted_before_range_check(tmp_path: Path) -> None:
    path = _csv(tmp_path, "study_id,weight[lb],age[months]\ns1,220.46226,600\n")
    rec = read_clinical_csv(path, SCHEMA)["s1"]
    assert rec["weight"] == pytest.approx(100.0, abs=1e-4)
    assert rec["age"] == pytest.approx(50.0)


def test_schema_declared_conversion_and_unknown_unit(tmp_path: Path) -> None:
    schema = {"crp": {"type": "numeric", "unit": "mg/L", "convert": {"umol/L": [2.0, 1.0]}}}
    path = _csv(tmp_path, "study_id,crp[umol/L]\ns1,3\n")
    assert read_clinical_csv(path, schema)["s1"]["crp"] == pytest.approx(7.0)
    path = _csv(tmp_path, "study_id,crp[furlongs]\ns1,3\n")
    with pytest.raises(ClinicalSchemaError, match=r"furlongs.*convert"):
        read_clinical_csv(path, schema)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ("s1,150,70,F", r"line 3, column `age`.*range \[0, 120\] years"),
        ("s1,abc,70,F", r"line 3, column `age`.*not a number"),
        ("s1,40,70,X", r"line 3, column `sex`.*levels \['F', 'M'\]"),
        ("s1,40,70", r"line 3 .* 3 cells"),
    ],
)
def test_bad_values_name_line_and_column_not_value(tmp_path: Path, row: str, pattern: str) -> None:
    path = _csv(tmp_path, f"study_id,age,weight,sex\ns0,1,2,F\n{row}\n")
    with pytest.raises(ClinicalSchemaError, match=pattern) as err:
        read_clinical_csv(path, SCHEMA)
    assert err.value.code == "CLINICAL_SCHEMA"
    assert "abc" not in str(err.value) and "150" not in str(err.value)


def test_duplicate_and_missing_ids_refused(tmp_path: Path) -> None:
    with pytest.raises(ClinicalSchemaError, match="repeats"):
        read_clinical_csv(_csv(tmp_path, "study_id,age\ns1,3\ns1,4\n"), SCHEMA)
    with pytest.raises(ClinicalSchemaError, match="empty `study_id`"):
        read_clinical_csv(_csv(tmp_path, "study_id,age\n,3\n"), SCHEMA)
    with pytest.raises(ClinicalSchemaError, match="no `study_id` column"):
        read_clinical_csv(_csv(tmp_path, "id,age\ns1,3\n"), SCHEMA)
    with pytest.raises(ClinicalSchemaError, match="does not exist"):
        read_clinical_csv(tmp_path / "absent.csv", SCHEMA)


def test_schema_column_absent_is_missing_everywhere(tmp_path: Path) -> None:
    table = read_clinical_csv(_csv(tmp_path, "study_id,age\ns1,3\n"), SCHEMA)
    assert table["s1"] == {"age": 3.0, "weight": None, "sex": None, "smoker": None}
    assert "CLINICAL_COLUMN_MISSING" in [f.code for f in table.issues]


def test_without_schema_keeps_text(tmp_path: Path) -> None:
    table = read_clinical_csv(_csv(tmp_path, "\ufeffstudy_id,age,sex\ns1, 3 ,NA\n"))
    assert table == {"s1": {"age": "3", "sex": None}}


def test_schema_round_trip_and_refusals() -> None:
    schema = ClinicalSchema.from_dict(SCHEMA)
    assert ClinicalSchema.from_dict(schema.to_dict()).to_dict() == schema.to_dict()
    assert schema.columns == ("age", "weight", "sex", "smoker")
    assert ClinicalSchema.from_dict({"age": "numeric"}).variables["age"].type == "numeric"
    for bad in (
        {"age": {"type": "number"}},
        {"age": {"type": "numeric", "range": [10, 1]}},
        {"age": {"type": "numeric", "levels": [1, 2]}},
        {"sex": {"type": "categorical", "range": [0, 1]}},
        {"sex": {"type": "categorical", "levels": ["F", "F"]}},
        {"age": {"type": "numeric", "rnage": [0, 1]}},
        {},
    ):
        with pytest.raises(ClinicalSchemaError):
            ClinicalSchema.from_dict(bad)


def test_validate_record() -> None:
    rec = validate_record({"age": "61", "sex": "f", "weight": None, "extra": 1}, SCHEMA)
    assert rec == {"age": 61.0, "weight": None, "sex": "F", "smoker": None}
    assert validate_record(None, SCHEMA)["age"] is None
    with pytest.raises(ClinicalSchemaError):
        validate_record({"age": -3}, SCHEMA)
    with pytest.raises(ClinicalSchemaError):
        validate_record({"age": True}, SCHEMA)
