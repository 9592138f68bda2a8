"""Regenerate ``data_samples/``: a few small synthetic studies, deterministically.

Run from the repository root::

    .venv/bin/python pipelines/make_samples.py            # rewrites data_samples/
    .venv/bin/python pipelines/make_samples.py --out /tmp/samples

The same code always writes the same bytes (seeded arrays, UIDs derived from the seed,
gzip without timestamps), and ``tests/test_samples.py`` checks that the committed files
equal a fresh regeneration. Everything comes from :mod:`medfusion.testing.synthetic`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from medfusion.testing.synthetic import write_cohort

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data_samples"
N_STUDIES = 4
SEED = 2026
# Files this script owns inside the output folder (removed before writing, nothing else is).
GENERATED = (
    "studies",
    "manifest.csv",
    "clinical.csv",
    "labels.csv",
    "clinical_schema.json",
    "truth.json",
    "README.md",
)

README = """\
# data_samples: synthetic studies bundled with medfusion

Made by `pipelines/make_samples.py` (seed {seed}) from `medfusion.testing.synthetic`; do not
edit by hand. Regenerate with `.venv/bin/python pipelines/make_samples.py`; the test
`tests/test_samples.py` checks that the files here equal a fresh regeneration byte for byte.
No real patient data: every image is computed.

| path | what |
|---|---|
| `studies/study-NNN/ct/` | CT DICOM series, 24 axial 40x40 slices, 0.9x0.9x2.5 mm, HU |
| `studies/study-NNN/mr.nii.gz` | MR NIfTI, 32x32x20, 1.2x1.2x3 mm, same world frame as the CT |
| `studies/study-NNN/xray.dcm` | DX radiograph, 64x64, 0.6 mm, MONOCHROME2 |
| `manifest.csv` | study_id, label, patient_id, split, relative image path per role, clinical |
| `clinical.csv` | study_id + age (years), sex (F/M), smoker (no/yes), crp (mg/L); empty = missing |
| `clinical_schema.json` | the declared schema of those columns (`ClinicalSchema.from_dict`) |
| `labels.csv` | study_id, label, patient_id, site, sex |
| `truth.json` | the planted lesion's centre per role (world mm and voxel), for explanation checks |

Label `abnormal` means a bright lesion (+200..350 HU in CT, brighter in MR and on the
radiograph) at one world position; `normal` studies have none. The clinical values carry a
weaker part of the signal.

The DICOM headers deliberately carry **fake sentinel identifiers** (PatientName
`ZZTEST^SENTINEL`, PatientID, birth date, accession number, institution, a free-text comment
and a private tag), so tests can prove that medfusion never lets them reach its outputs.
"""


def make_samples(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write the sample cohort to ``out``; return every file written (sorted)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    write_cohort(out, N_STUDIES, seed=SEED)
    (out / "README.md").write_text(README.format(seed=SEED), encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    files = make_samples(args.out)
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
