"""A semi-synthetic cohort with free-text notes: image, clinical record and note each carry
part of the signal (tests, docs/text.md and ``pipelines/bench_text.py``).

Per study, label ``y`` (balanced) and three conditionally independent views of it:

* ``mr.nii.gz`` (``image=True``): a noisy 3D volume with a blob whose contrast is shifted
  by ``y`` (``image_signal`` standard deviations);
* clinical ``marker`` ~ N(``clinical_signal`` * y, 1) and a noise variable ``age``;
* the note ``history.txt``: filler sentences plus a few finding phrases; each phrase names
  a finding more common in the positive class (``note_signal`` sets how much), sometimes
  negated ("no cough"), so word order matters a little.

Optionally a surname (``planted_name``) is written into the notes of the first
``planted_patients`` patients: the privacy tests check it never reaches a model package or
an output when fewer than k patients' notes hold it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfusion.testing.synthetic import write_nifti

POSITIVE = ("cough", "dyspnoea", "fever", "haemoptysis", "weight loss", "night sweats")
NEUTRAL = ("headache", "back pain", "fatigue", "nausea", "dizziness", "rash")
FILLER = (
    "Referred by the general practitioner for imaging.",
    "Patient seen in clinic today.",
    "History reviewed with the patient.",
    "Previous imaging not available for comparison.",
    "Nonsmoker, lives with family.",
    "Medication list reviewed.",
    "Presents for evaluation.",
    "Outpatient request.",
)


@dataclass(frozen=True)
class NoteCohort:
    """Where the cohort was written and the per-study truth (no identifiers)."""

    root: Path
    manifest: Path
    studies: Path
    labels: dict[str, int]


def _note(rng: np.random.Generator, y: int, signal: float) -> str:
    sentences = list(rng.choice(FILLER, size=int(rng.integers(2, 5)), replace=False))
    for _ in range(3):
        p_pos = float(np.clip(0.3 + signal * (0.35 if y else -0.15), 0.02, 0.98))
        finding = str(rng.choice(POSITIVE if rng.random() < p_pos else NEUTRAL))
        if rng.random() < 0.2:  # a negated finding says nothing about the label
            finding = str(rng.choice(POSITIVE))
            sentences.append(f"No {finding} reported.")
        else:
            sentences.append(f"Complains of {finding}.")
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


def _volume(rng: np.random.Generator, y: int, size: int, signal: float) -> np.ndarray:
    grid = np.indices((size, size, size)).astype(np.float32) - (size - 1) / 2.0
    radius = np.sqrt((grid ** 2).sum(axis=0))
    contrast = 1.0 + 0.5 * (signal * (y - 0.5) * 2.0 + float(rng.normal()))
    volume = 100.0 + 10.0 * rng.normal(size=(size, size, size))
    volume += 40.0 * contrast * (radius < size / 4.0)
    return volume.astype(np.float32)


def write_note_cohort(out_dir: str | Path, n_studies: int, *, seed: int = 0,
                      image: bool = True, image_size: int = 16, inline: bool = False,
                      image_signal: float = 1.0, clinical_signal: float = 0.9,
                      note_signal: float = 1.0, missing_note: float = 0.0,
                      missing_image: float = 0.0, planted_name: str | None = None,
                      planted_patients: int = 3, splits: bool = False) -> NoteCohort:
    """Write ``n_studies`` studies under ``out_dir`` (``studies/study-NNN/`` with
    ``mr.nii.gz`` and ``history.txt``) and ``manifest.csv`` with columns ``study_id,
    label, patient_id, [mr,] history, marker, age``. ``history`` holds the note's path
    (relative to the manifest) or, with ``inline``, the note itself; an empty cell where
    the note is missing (``missing_note`` per study; ``missing_image`` likewise, never
    both). ``splits`` adds a ``split`` column: 70% train, 15% val, 15% test, stratified by
    label."""
    rng = np.random.default_rng([int(seed), 0x7E47])
    root = Path(out_dir)
    studies = root / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    labels = rng.permutation(np.arange(n_studies) % 2)
    header = ["study_id", "label", "patient_id", *(["split"] if splits else []),
              *(["mr"] if image else []), "history", "marker", "age"]
    rank = np.zeros(n_studies, dtype=np.int64)  # position of each study within its label
    for y in (0, 1):
        idx = np.flatnonzero(labels == y)
        rank[idx] = np.arange(len(idx))
    counts = np.bincount(labels, minlength=2)
    rows: list[list[str]] = []
    truth: dict[str, int] = {}
    for n in range(n_studies):
        sid = f"study-{n:03d}"
        y = int(labels[n])
        truth[sid] = y
        folder = studies / sid
        folder.mkdir(exist_ok=True)
        note = _note(rng, y, note_signal)
        if planted_name and n < planted_patients:
            note = f"Seen with Mrs {planted_name} today. " + note
        drop_note = rng.random() < missing_note
        drop_image = image and not drop_note and rng.random() < missing_image
        cells = [sid, "abnormal" if y else "normal", f"p{n:04d}"]
        if splits:
            q = rank[n] / max(1, counts[y])
            cells.append("train" if q < 0.7 else "val" if q < 0.85 else "test")
        if image:
            if drop_image:
                cells.append("")
            else:
                write_nifti(folder / "mr.nii.gz", _volume(rng, y, image_size, image_signal),
                            np.diag([1.5, 1.5, 1.5, 1.0]), "MR")
                cells.append(f"studies/{sid}/mr.nii.gz")
        if drop_note:
            cells.append("")
        else:
            (folder / "history.txt").write_text(note, encoding="utf-8")
            cells.append(note if inline else f"studies/{sid}/history.txt")
        marker = rng.normal(clinical_signal * y, 1.0)
        cells += [f"{marker:.3f}", f"{rng.normal(60, 10):.0f}"]
        rows.append(cells)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return NoteCohort(root=root, manifest=manifest, studies=studies, labels=truth)
