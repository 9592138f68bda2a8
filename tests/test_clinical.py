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
    rec = read_clinical_csv(path, SCHEMA, allow_missing_clinical=True)["s1"]
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
        read_clinical_csv(path, SCHEMA, allow_missing_clinical=True)
    assert err.value.code == "CLINICAL_SCHEMA"
    assert "abc" not in str(err.value) and "150" not in str(err.value)


@pytest.mark.parametrize("bad_values", ["raise", "collect"])
def test_duplicate_and_missing_ids_refused(tmp_path: Path, bad_values: str) -> None:
    # Structural problems of the file stay fatal even when bad cells are only set aside.
    kw = {"allow_missing_clinical": True, "bad_values": bad_values}
    with pytest.raises(ClinicalSchemaError, match="repeats"):
        read_clinical_csv(_csv(tmp_path, "study_id,age\ns1,3\ns1,4\n"), SCHEMA, **kw)
    # A row set aside still holds its id: a repeat of it is refused too.
    with pytest.raises(ClinicalSchemaError, match="repeats" if bad_values == "collect" else "age"):
        read_clinical_csv(_csv(tmp_path, "study_id,age\ns1,abc\ns1,4\n"), SCHEMA, **kw)
    with pytest.raises(ClinicalSchemaError, match="empty `study_id`"):
        read_clinical_csv(_csv(tmp_path, "study_id,age\n,3\n"), SCHEMA, **kw)
    with pytest.raises(ClinicalSchemaError, match="no `study_id` column"):
        read_clinical_csv(_csv(tmp_path, "id,age\ns1,3\n"), SCHEMA, **kw)
    with pytest.raises(ClinicalSchemaError, match="does not exist"):
        read_clinical_csv(tmp_path / "absent.csv", SCHEMA, **kw)
    with pytest.raises(ClinicalSchemaError, match="2 cells"):
        read_clinical_csv(_csv(tmp_path, "study_id,age,sex\ns1,3\n"), SCHEMA, **kw)


def test_schema_column_absent_is_refused_unless_accepted(tmp_path: Path) -> None:
    path = _csv(tmp_path, "study_id,age\ns1,3\n")
    with pytest.raises(ClinicalSchemaError) as err:
        read_clinical_csv(path, SCHEMA)
    assert err.value.code == "CLINICAL_SCHEMA"
    for fragment in ("`weight`, `sex`, `smoker`", "--allow-missing-clinical",
                     "CLINICAL_COLUMNS_MISSING"):
        assert fragment in err.value.message
    table = read_clinical_csv(path, SCHEMA, allow_missing_clinical=True)
    assert table["s1"] == {"age": 3.0, "weight": None, "sex": None, "smoker": None}
    assert table.absent == ("weight", "sex", "smoker")
    findings = {f.code: f.details for f in table.issues}
    assert findings["CLINICAL_COLUMNS_MISSING"]["columns"] == ["weight", "sex", "smoker"]


@pytest.mark.parametrize(
    ("header", "spelled"),
    [
        ("study_id,Age,weight,sex,smoker", "`Age` for `age`"),
        ("study_id,AGE[years],weight,sex,smoker", "`AGE[years]` for `age`"),
        ("study_id,age (years),weight,sex,smoker", "`age (years)` for `age`"),
        ("study_id,age_yrs,weight,sex,smoker", "`age_yrs` for `age`"),
        ("study_id,age,Weight_kg,sex,smoker", "`Weight_kg` for `weight`"),
        ("study_id,age,weight, Sex ,smoker", "`Sex` for `sex`"),
    ],
)
@pytest.mark.parametrize("allow", [False, True])
def test_renamed_column_is_refused_even_when_absence_is_accepted(
    tmp_path: Path, header: str, spelled: str, allow: bool
) -> None:
    path = _csv(tmp_path, f"{header}\ns1,63,80,F,no\n")
    with pytest.raises(ClinicalSchemaError) as err:
        read_clinical_csv(path, SCHEMA, allow_missing_clinical=allow)
    assert err.value.code == "CLINICAL_SCHEMA"
    assert spelled in err.value.message and "rename" in err.value.message


def test_unit_suffix_only_counts_for_the_variables_units(tmp_path: Path) -> None:
    # `sex_m` is a dummy column, not `sex` in metres: with `sex` present it is just unknown.
    path = _csv(tmp_path, "study_id,age,weight,sex,smoker,sex_m,Age2\ns1,63,80,F,no,1,5\n")
    table = read_clinical_csv(path, SCHEMA)
    assert table["s1"]["sex"] == "F"
    assert {f.code: f.details for f in table.issues}["CLINICAL_UNKNOWN_COLUMNS"] == {
        "columns": ["sex_m", "Age2"]}


def test_none_is_missing_and_bad_cells_can_be_set_aside_per_row(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "study_id,age,weight,sex,smoker\n"
        "s1,None,NONE,none, None \n"
        "s2,abc,70,F,no\n"
        "s3,40,70,X,no\n"
        "s4,40,999,F,no\n"
        "s5,abc,70,X,no\n"
        "s6,41,71,M,yes\n",
    )
    with pytest.raises(ClinicalSchemaError, match="line 3, column `age`"):
        read_clinical_csv(path, SCHEMA)
    table = read_clinical_csv(path, SCHEMA, bad_values="collect")
    assert table["s1"] == {"age": None, "weight": None, "sex": None, "smoker": None}
    assert table["s6"] == {"age": 41.0, "weight": 71.0, "sex": "M", "smoker": "yes"}
    assert sorted(table) == ["s1", "s6"]
    assert sorted(table.errors) == ["s2", "s3", "s4", "s5"]
    assert "line 3, column `age`" in table.errors["s2"]
    assert "line 4, column `sex`" in table.errors["s3"]
    assert "line 5, column `weight`" in table.errors["s4"]
    assert "column `age`" in table.errors["s5"] and "`sex`" in table.errors["s5"]
    for sid, message in table.errors.items():
        assert sid not in message
        for value in ("abc", "999", "X,"):
            assert value not in message


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
    assert validate_record({"age": "None", "sex": "none"}, SCHEMA)["age"] is None
    with pytest.raises(ClinicalSchemaError, match="`Age` for `age`"):
        validate_record({"Age": 61}, SCHEMA)
