"""``predict_manifest``: every study of a manifest CSV through one model, into a CSV
(``medfusion predict``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from medfusion.atomic import atomic_open
from medfusion.errors import ClinicalSchemaError, MedfusionError, OutputError
from medfusion.explain.api import DEFAULT_CAM_METHOD
from medfusion.explain.dicom import ModelIdentity, write_dicom_results
from medfusion.explain.export import write_explanation
from medfusion.inference.model import FusionModel
from medfusion.inference.table import prediction_columns, prediction_row
from medfusion.io.clinical import FLAG_COLUMNS_MISSING
from medfusion.io.manifest import read_manifest_rows
from medfusion.io.notes import NOTE_EMPTY, resolve_note
from medfusion.io.volume import load_volume
from medfusion.keys import pseudonym, safe_component
from medfusion.types import Finding, Study

log = logging.getLogger("medfusion.inference")

#: the column ``predict`` adds to the predictions table
ERROR_COLUMN = "error"


def predict_columns(model: FusionModel, *, explain: bool) -> list[str]:
    """The columns of a ``medfusion predict`` CSV: the predictions table, then ``error``."""
    return [*prediction_columns(model.labels, model.modalities, shapley=explain), ERROR_COLUMN]


def predict_manifest(model_dir: str | Path, manifest: str | Path, out_csv: str | Path, *,
                     explain: bool = False, saliency_dir: str | Path | None = None,
                     alpha: float = 0.1, allow_missing_clinical: bool = False,
                     cam_method: str = DEFAULT_CAM_METHOD, dicom_dir: str | Path | None = None,
                     dicom_deidentified: bool = False) -> Path:
    """Score every row of ``manifest`` with the model in ``model_dir`` into ``out_csv``.

    Columns: the predictions table (:mod:`medfusion.inference.table`; ``shapley_<modality>``
    with ``explain``), then ``error``: a stable error code for a row that could not be
    scored, its other cells empty (``CLINICAL_SCHEMA`` for a row with an invalid clinical
    cell). The manifest needs ``study_id`` and may omit ``label`` and role columns (modality
    missing). A clinical column of the model that the manifest lacks is refused
    (``CLINICAL_SCHEMA``) unless ``allow_missing_clinical`` (then missing for every study,
    each row flagged ``CLINICAL_COLUMNS_MISSING``); one spelled differently (``Age``) is
    always refused. With ``explain`` and ``saliency_dir``, saliency maps are written there
    (``cam_method``: ``gradcam`` or ``gradcam++``). With ``explain`` and ``dicom_dir``, each
    DICOM-sourced study's structured report and parametric maps are written to
    ``dicom_dir/<study_id>/`` (:mod:`medfusion.explain.dicom`): they carry the patient's
    identity unless ``dicom_deidentified``. The file is written atomically.
    """
    if dicom_dir is not None and not explain:
        raise MedfusionError("--dicom needs --explain (the parametric maps are the saliency "
                             "maps)", code="BAD_OPTION")
    model = FusionModel.load(model_dir)
    identity = ModelIdentity.of(model.card, model_dir)
    schema = model.card.clinical.schema if model.card.clinical is not None else None
    rows = read_manifest_rows(manifest, roles=model.roles, labels=model.labels,
                              clinical=schema, require_labels=False, require_columns=False,
                              allow_missing_clinical=allow_missing_clinical, bad_clinical="row",
                              text_roles=model.text_roles)
    out_csv = Path(out_csv)
    columns = predict_columns(model, explain=explain)
    lines: list[dict[str, str]] = []
    for row in rows:
        try:
            if row.clinical_error is not None:  # this study only: the others are scored
                raise ClinicalSchemaError(row.clinical_error)
            volumes = {r: load_volume(p) for r, p in row.paths.items() if p is not None}
            notes: dict[str, str] = {}
            issues: list[Finding] = []
            for role, source in row.notes.items():
                text = resolve_note(source, role)
                if text is not None:
                    notes[role] = text
                elif source is not None:  # a note file or cell that holds only blanks
                    issues.append(Finding(NOTE_EMPTY, f"the `{role}` note is empty.",
                                          {"role": role}))
            study = Study(key=pseudonym(row.study_id, prefix="st-"), volumes=volumes,
                          clinical=row.clinical, notes=notes, issues=tuple(issues))
            pred = model.predict(study, explain=explain, alpha=alpha, cam_method=cam_method)
        except MedfusionError as exc:
            log.warning("manifest line %d not scored (%s)", row.line, exc.code)
            lines.append({"study_id": row.study_id, ERROR_COLUMN: exc.code})
            continue
        # Clinical columns accepted as absent: say so on every row they could change.
        absent_flag = [FLAG_COLUMNS_MISSING] if row.clinical_absent else []
        lines.append(prediction_row(row.study_id, pred, model.labels, model.modalities,
                                    shapley=explain, extra_flags=absent_flag))
        if saliency_dir is not None and pred.explanation is not None:
            try:
                write_explanation(pred.explanation, Path(saliency_dir), row.study_id,
                                  images=study.volumes, study_key=study.key)
            except MedfusionError as exc:
                log.warning("manifest line %d: saliency not written (%s)", row.line, exc.code)
        if dicom_dir is not None and pred.explanation is not None:
            folder = Path(dicom_dir) / safe_component(row.study_id, prefix="st-")
            try:
                used = {r: v for r, v in study.volumes.items() if r in pred.modalities_used}
                results = write_dicom_results(pred, pred.explanation, used, folder,
                                              model=identity, study_key=study.key, alpha=alpha,
                                              deidentify=dicom_deidentified)
            except MedfusionError as exc:
                log.warning("manifest line %d: DICOM objects not written (%s)", row.line,
                            exc.code)
            else:
                if results.sr is None:
                    log.info("manifest line %d: no DICOM objects (%s)", row.line,
                             results.skipped.get("study", ""))
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for line in lines:
                writer.writerow({c: line.get(c, "") for c in columns})
    except OSError as exc:
        raise OutputError(f"could not write the predictions CSV ({type(exc).__name__}); "
                          "check the output folder exists and is writable.") from None
    return out_csv
