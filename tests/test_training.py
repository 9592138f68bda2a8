"""Recipe and manifest validation, patient-grouped splits, bad-row skipping."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medfusion.errors import ManifestError, RecipeError
from medfusion.training.manifest import ManifestRow, assign_splits, read_manifest
from medfusion.training.recipe import load_recipe

BASE = {
    "labels": ["normal", "abnormal"],
    "modalities": {"ct": {}},
    "clinical": {"age": {"type": "numeric"}, "sex": {"type": "categorical"}},
    "fusion": "attention",
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- recipes -----------------------------------------------------------------------------
def test_contract_recipe_loads_with_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", """
labels: [normal, abnormal]
modalities:
  ct: {}
  xray: {grid: [64, 64, 1]}
clinical:
  age: {type: numeric}
  sex: {type: categorical}
fusion: gated
""")
    recipe = load_recipe(path)
    assert recipe.labels == ("normal", "abnormal")
    assert recipe.roles == ("ct", "xray")
    assert recipe.modalities["ct"].normalization == "ct"
    assert recipe.modalities["xray"].spatial_dims == 2
    assert recipe.fusion == "gated"
    # The resolved recipe is plain JSON and loads back to the same recipe.
    assert load_recipe(recipe.to_dict()) == recipe


def test_single_modality_recipes_are_valid() -> None:
    assert load_recipe({"labels": ["a", "b"], "modalities": {"mr": {}}}).clinical == {}
    clin = load_recipe({"labels": ["a", "b"], "clinical": {"age": {"type": "numeric"}}})
    assert clin.roles == ()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"optimizer": "sgd"}, "Unknown recipe key"),
        ({"fusion": "medfusion.models.heads.AttentionHead"}, "never by import path"),
        ({"fusion": "transformer"}, "fusion"),
        ({"encoder": "monai.networks.nets.DenseNet121"}, "never by import path"),
        ({"modalities": {"ct": {"encoder": "os:system"}}}, "encoder"),
        ({"modalities": {"ct": {"kernel_size": 3}}}, "Unknown option"),
        ({"modalities": {"ct": {"grid": [4, 4, 4]}}}, "too small"),
        ({"modalities": {}, "clinical": {}}, "at least one"),
        ({"labels": ["only"]}, "labels"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"clinical": {"age": {"type": "text"}}}, "numeric or categorical"),
        ({"epochs": 0}, "epochs"),
        ({"modalities": {"clinical": {}}}, "reserved"),
    ],
)
def test_bad_recipes_are_refused(change: dict, fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe({**BASE, **change})
    assert info.value.code == "RECIPE"
    assert fragment in info.value.message


def test_python_tag_in_yaml_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.yaml", f"""
labels: [a, b]
modalities: {{ct: {{}}}}
fusion: !!python/object/apply:os.system ["touch {marker}"]
""")
    with pytest.raises(RecipeError, match="python tag"):
        load_recipe(path)
    assert not marker.exists()


def test_missing_or_non_mapping_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError):
        load_recipe(_write(tmp_path / "list.yaml", "- a\n- b\n"))


# --- manifests ---------------------------------------------------------------------------
def _manifest(tmp_path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "ct.nii.gz").write_bytes(b"x")
    columns = columns or ["study_id", "label", "patient_id", "ct", "age", "sex"]
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _row(i: int, **kw: str) -> dict:
    return {"study_id": f"s{i}", "label": "normal", "patient_id": f"p{i}",
            "ct": "img/ct.nii.gz", "age": "60", "sex": "F", **kw}


def test_manifest_reads_paths_relative_to_its_folder(tmp_path: Path) -> None:
    recipe = load_recipe(BASE)
    rows = read_manifest(_manifest(tmp_path, [_row(0), _row(1, ct="", age="NA")]), recipe)
    assert rows[0].paths["ct"] == tmp_path / "img" / "ct.nii.gz"
    assert rows[1].paths["ct"] is None
    assert rows[1].clinical == {"age": None, "sex": "F"}
    assert rows[0].clinical == {"age": 60.0, "sex": "F"}


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([_row(0), _row(0)], "duplicate study_id"),
        ([_row(0, label="sick")], "not one of the recipe labels"),
        ([_row(0, ct="img/missing.nii.gz")], "does not exist"),
        ([_row(0, age="sixty")], "expected a number"),
        ([_row(0, split="holdout")], "split"),
        ([_row(0, study_id="")], "empty study_id"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, rows: list[dict], fragment: str) -> None:
    columns = ["study_id", "label", "patient_id", "split", "ct", "age", "sex"]
    with pytest.raises(ManifestError) as info:
        read_manifest(_manifest(tmp_path, rows, columns), load_recipe(BASE))
    assert info.value.code == "MANIFEST"
    assert fragment in info.value.message


def test_manifest_missing_column_and_file(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [_row(0)], ["study_id", "label", "ct"])
    with pytest.raises(ManifestError, match="age"):
        read_manifest(path, load_recipe(BASE))
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "nope.csv", load_recipe(BASE))


def test_error_messages_carry_no_identifiers(tmp_path: Path) -> None:
    rows = [_row(0, study_id="DOE^JOHN", patient_id="MRN123", ct="img/DOE_JOHN.nii.gz")]
    with pytest.raises(ManifestError) as info:
        read_manifest(_manifest(tmp_path, rows), load_recipe(BASE))
    for secret in ("DOE", "JOHN", "MRN123"):
        assert secret not in str(info.value)


# --- splits ------------------------------------------------------------------------------
def _rows(n_patients: int, seed: int) -> list[ManifestRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.4)
        for _ in range(int(rng.integers(1, 4))):  # 1-3 studies per patient
            i = len(rows)
            rows.append(ManifestRow(i + 2, f"s{i}", label, f"p{p}", None, {}, None))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_split_never_puts_a_patient_on_both_sides(seed: int) -> None:
    rows = _rows(60, seed)
    splits = assign_splits(rows, val_fraction=0.15, test_fraction=0.15, seed=seed)
    by_patient: dict[str, set[str]] = {}
    for row, split in zip(rows, splits, strict=True):
        by_patient.setdefault(row.patient_id, set()).add(split)
    assert all(len(s) == 1 for s in by_patient.values())
    for split in ("train", "val", "test"):
        labels = {r.label for r, s in zip(rows, splits, strict=True) if s == split}
        assert labels == {0, 1}, f"{split} is not stratified"
    assert splits.count("train") > splits.count("val")
    # Deterministic for a seed.
    assert splits == assign_splits(rows, val_fraction=0.15, test_fraction=0.15, seed=seed)


def test_given_splits_are_respected_and_val_is_carved_from_train() -> None:
    rows = [ManifestRow(i + 2, f"s{i}", i % 2, f"p{i}", "test" if i < 4 else "train", {}, None)
            for i in range(40)]
    splits = assign_splits(rows, val_fraction=0.2, test_fraction=0.15, seed=0)
    assert splits[:4] == ["test"] * 4
    assert "val" in splits and "test" not in splits[4:]


def test_patient_given_two_splits_is_refused() -> None:
    rows = [ManifestRow(2, "a", 0, "p1", "train", {}, None),
            ManifestRow(3, "b", 1, "p1", "test", {}, None)]
    with pytest.raises(ManifestError, match="both sides"):
        assign_splits(rows, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_rows_without_split_follow_their_patient() -> None:
    rows = [ManifestRow(2, "a", 0, "p1", "test", {}, None),
            ManifestRow(3, "b", 1, "p1", None, {}, None)]
    rows += [ManifestRow(i + 4, f"s{i}", i % 2, f"q{i}", None, {}, None) for i in range(20)]
    splits = assign_splits(rows, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits[1] == "test"


def test_flip_tta_follows_flip_augmentation_unless_set() -> None:
    """A model trained on flipped volumes is asked all 8 flips by default; one that never
    saw a flip is not; an explicit ``tta`` wins either way."""
    base = {"labels": ["a", "b"], "modalities": {"ct": {}}}
    assert load_recipe(base).tta is True
    assert load_recipe({**base, "augment": "none"}).tta is False
    assert load_recipe({**base, "augment": "flip_permute"}).tta is True
    assert load_recipe({**base, "tta": False}).tta is False
    assert load_recipe({**base, "augment": "none", "tta": True}).tta is True
    # the resolved recipe stored in a card reloads to the same choice
    assert load_recipe(load_recipe(base).to_dict()).tta is True
