"""G1-G3: planted identifiers never reach inspect output, keys, issues, errors or the CLI.

Identifiers are planted in DICOM headers (names, IDs, birth date, accession number,
institution, free text, private tags), in file and folder names, and in a NIfTI header's
free-text field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from rich.console import Console

from medfusion.errors import MedfusionError
from medfusion.io.inspect import inspect_path, render_inspection
from medfusion.io.study import load_study
from medfusion.testing.dicom_factory import (
    SENTINEL_FILE_STEM,
    SENTINEL_FREE_TEXT,
    SENTINEL_PRIVATE,
    SENTINELS,
    write_radiograph,
    write_series,
)

NAME_IN_PATHS = "ZZTEST_Doe_John"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A batch root with two studies carrying identifiers, one of them broken."""
    root = tmp_path_factory.mktemp("phi") / "batch"
    good = root / f"{NAME_IN_PATHS}_study"
    ct = write_series(good / f"{NAME_IN_PATHS}_ct", np.zeros((8, 8, 5)), seed=5,
                      file_names="sentinel", n_private_tags=3,
                      series_description="AXIAL")
    xray = write_radiograph(good / f"{SENTINEL_FILE_STEM}.dcm",
                            np.full((16, 12), 100, np.uint16), seed=5)
    img = nib.Nifti1Image(np.ones((6, 6, 4), np.float32), np.eye(4))
    img.header["descrip"] = f"MR {SENTINELS['PatientName']}".encode()
    img.header["aux_file"] = b"ZZTEST-AUX"
    nib.save(img, str(good / f"{NAME_IN_PATHS}.nii.gz"))
    broken = root / "ZZTEST_Smith_Jane"
    paths = write_series(broken / "series", np.zeros((8, 8, 5)), seed=6, file_names="sentinel")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:-40])

    forbidden = [*SENTINELS.values(), SENTINEL_FREE_TEXT, SENTINEL_PRIVATE, SENTINEL_FILE_STEM,
                 NAME_IN_PATHS, "Doe", "Smith", "ZZTEST", str(root)]
    for path in [*ct, xray, *paths]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID"):
            if tag in ds:
                forbidden.append(str(ds.data_element(tag).value))
    return root, sorted(set(forbidden))


def _assert_clean(text: str, forbidden: list[str]) -> None:
    leaks = [f for f in forbidden if f.lower() in text.lower()]
    assert leaks == [], f"identifiers leaked: {leaks}"


def test_inspect_json_and_table_are_phi_free(planted) -> None:
    root, forbidden = planted
    report = inspect_path(root)
    assert report["n_studies"] == 2 and report["n_failed"] == 1
    good = next(s for s in report["studies"] if "error" not in s)
    assert set(good["roles"]) == {"ct", "mr", "xray"}
    _assert_clean(json.dumps(report), forbidden)
    console = Console(record=True, width=200)
    render_inspection(report, console)
    _assert_clean(console.export_text(), forbidden)


def test_study_keys_meta_issues_and_errors_are_phi_free(planted) -> None:
    root, forbidden = planted
    study = load_study(root / f"{NAME_IN_PATHS}_study")
    dumped = json.dumps({
        "key": study.key,
        "issues": [f.to_dict() for f in study.issues],
        "meta": {r: {k: str(v) for k, v in v.meta.items()} for r, v in study.volumes.items()},
        "summary": {r: v.summary() for r, v in study.volumes.items()},
    })
    _assert_clean(dumped, forbidden)
    with pytest.raises(MedfusionError) as err:
        load_study(root / "ZZTEST_Smith_Jane")
    _assert_clean(str(err.value), forbidden)


def test_cli_inspect_stdout_stderr_are_phi_free(planted) -> None:
    root, forbidden = planted
    env = {**os.environ, "COLUMNS": "200"}
    outputs = {}
    for name, args in {"table": ["inspect", str(root)],
                       "json": ["inspect", str(root), "--json"],
                       "error": ["inspect", str(root / "ZZTEST_Smith_Jane")]}.items():
        proc = subprocess.run([sys.executable, "-m", "medfusion.cli", *args],
                              capture_output=True, text=True, timeout=120, env=env)
        outputs[name] = proc
        assert "Traceback" not in proc.stdout + proc.stderr
        _assert_clean(proc.stdout + proc.stderr, forbidden)
    assert outputs["table"].returncode == 0 and "st-" in outputs["table"].stdout
    assert json.loads(outputs["json"].stdout)["n_studies"] == 2
    failed = outputs["error"]
    assert failed.returncode == 1 and "[TRUNCATED]" in failed.stderr


def test_cli_unexpected_error_is_one_line_without_its_text(monkeypatch, capsys,
                                                           tmp_path: Path) -> None:
    """Any command (predict here, which has no handler of its own): an unexpected exception
    is one INTERNAL line naming its type, no traceback, no message text, no locals."""
    import medfusion.inference
    from medfusion.cli import main

    secret = str(tmp_path / "Doe_John_19700101" / "IM0001")

    def boom(*args, **kwargs):
        raise RuntimeError(f"cannot read {secret}")

    monkeypatch.setattr(medfusion.inference, "predict_manifest", boom)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path / "Doe_John_19700101"), "--manifest",
              str(tmp_path / "m.csv"), "--out", str(tmp_path / "p.csv")])
    assert info.value.code == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "[INTERNAL] unexpected RuntimeError" in text
    assert "Doe_John" not in text and "Traceback" not in text
