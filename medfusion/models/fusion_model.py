"""FusionModel: a trained model package, loaded and ready to predict.

A package (written by :func:`medfusion.training.trainer.train`) is a folder with
``model.json`` (the card: recipe, labels, network config, preprocessing spec per role,
fitted clinical preprocessing, calibration, metrics) and ``weights.safetensors``; loading goes
through :func:`medfusion.models.package.load_package`, which checks the sha256 and refuses
pickles without running them.

Prediction is split in two so a batch scorer can parallelise the expensive half:

* :meth:`FusionModel.prepare` (in worker processes): a Study's volumes -> small model tensors
  (:class:`PreparedInputs`), plus the prepared/source Volumes needed to map explanations back;
* :meth:`FusionModel.predict_prepared` (in the parent): a batch of PreparedInputs ->
  :class:`~medfusion.types.Prediction` objects (calibrated + raw probabilities, modality
  weights, uncertainty, conformal set, optional explanation).

:meth:`FusionModel.predict` does both for one study; :func:`predict_manifest` scores a
manifest CSV into a predictions CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.atomic import atomic_open
from medfusion.device import module_device
from medfusion.errors import (
    ClinicalSchemaError,
    MedfusionError,
    ModalityMismatchError,
    ModelPackageError,
    OutputError,
)
from medfusion.types import Prediction, Study, Volume
from medfusion.uncertainty.domain import InputDomain, is_input_range_flag
from medfusion.uncertainty.shift import FLAG_OOD

log = logging.getLogger("medfusion.models")

CLINICAL = "clinical"


# --- inference on arrays -----------------------------------------------------------------
def run_net(net: torch.nn.Module, images: Mapping[str, np.ndarray], clinical: np.ndarray | None,
            present: np.ndarray, batch_size: int = 32
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Eval-mode forward pass in batches: (logits (N,C), weights (N,M) | None,
    embeddings (N,M,E)) as numpy. The network's train/eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    device = module_device(net)  # the trainer validates on the GPU when there is one
    logits, weights, embeddings = [], [], []
    n = int(present.shape[0])
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                imgs = {r: torch.from_numpy(np.ascontiguousarray(a[sl])).to(device)
                        for r, a in images.items()}
                clin = None if clinical is None else torch.from_numpy(
                    np.ascontiguousarray(clinical[sl])).to(device)
                pres = torch.from_numpy(np.ascontiguousarray(present[sl])).to(device)
                out = net.head(net.encode(imgs, clin, pres), pres)
                logits.append(out.logits.float().cpu().numpy())
                embeddings.append(out.embeddings.float().cpu().numpy())
                if out.weights is not None:
                    weights.append(out.weights.float().cpu().numpy())
    finally:
        net.train(was_training)
    return (np.concatenate(logits), np.concatenate(weights) if weights else None,
            np.concatenate(embeddings))


def tta_variants(images: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The batch under every combination of flips of the spatial axes (identity first);
    unit axes (a radiograph's depth) are never flipped."""
    variants = []
    for axes in itertools.chain.from_iterable(
            itertools.combinations((2, 3, 4), k) for k in range(4)):
        variants.append({r: np.flip(a, axis=[ax for ax in axes if a.shape[ax] > 1])
                         if any(a.shape[ax] > 1 for ax in axes) else a
                         for r, a in images.items()})
    return variants


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- prepared inputs ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PreparedInputs:
    """One study, ready for the network. Small enough to send between processes when
    ``sources`` is empty (see :meth:`lite`).

    ``tensors[role]``: (1, I, J, K) float32 for every trained role (zeros when absent);
    ``present``: (M,) bool over ``modalities`` (trained roles sorted, then "clinical");
    ``clinical``: (F,) float32 preprocessed features or None for an image-only model;
    ``prepared[role]`` / ``sources[role]``: the model-grid Volume and the Volume as loaded
    (for mapping explanations back to the scanner grid).
    """

    study_key: str
    modalities: tuple[str, ...]
    tensors: Mapping[str, np.ndarray]
    present: np.ndarray
    clinical: np.ndarray | None
    prepared: Mapping[str, Volume] = field(default_factory=dict)
    sources: Mapping[str, Volume] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    @property
    def modalities_used(self) -> tuple[str, ...]:
        return tuple(m for m, p in zip(self.modalities, self.present, strict=False) if p)

    def lite(self) -> PreparedInputs:
        """A copy without the full-size source volumes (cheap to ship between processes)."""
        return dataclasses.replace(self, sources={})


def stack_prepared(batch: Sequence[PreparedInputs], roles: Sequence[str]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Batch arrays (images per role, clinical (N,F) or None, present (N,M))."""
    images = {r: np.stack([p.tensors[r] for p in batch]).astype(np.float32) for r in roles}
    clin = None
    if batch and batch[0].clinical is not None:
        clin = np.stack([p.clinical for p in batch]).astype(np.float32)
    present = np.stack([p.present for p in batch]).astype(bool)
    return images, clin, present


def _coerce_clinical(record: Mapping[str, Any] | None, schema: Mapping[str, Mapping[str, Any]]
                     ) -> dict[str, Any] | None:
    """The study's clinical values for the model's columns: numbers as float, None missing.

    Validated with the same rules as the clinical CSV reader (missing tokens, ranges, levels,
    a re-spelled key such as ``Age`` refused), so a record given in Python means what the
    same cells would mean in a file. Raises ClinicalSchemaError."""
    from medfusion.io.clinical import SCHEMA_KEYS, validate_record

    if record is None:
        return None
    # A card may keep keys of its own next to the schema's; only the schema's are checked.
    declared = {name: {k: v for k, v in spec.items() if k in SCHEMA_KEYS}
                for name, spec in schema.items()}
    return validate_record(record, declared)


# --- the model ---------------------------------------------------------------------------
class FusionModel:
    """A loaded model package. Build with :meth:`load` (from a folder)."""

    def __init__(self, card: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                 directory: Path | None = None) -> None:
        from medfusion.models.net import FusionNet, NetConfig
        from medfusion.preprocess import RoleSpec

        self.card: dict[str, Any] = dict(card)
        self.directory = directory
        try:
            self.labels: tuple[str, ...] = tuple(str(x) for x in card["labels"])
            self.config = NetConfig.from_dict(card["net"])
            self.roles: tuple[str, ...] = tuple(self.config.roles)
            self.modalities: tuple[str, ...] = tuple(self.config.modalities)
            self.role_specs = {r: RoleSpec.from_dict(d) for r, d in card["role_specs"].items()}
            members = list(card["members"])
            clinical = card.get("clinical")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelPackageError(
                f"model.json is incomplete or malformed ({type(exc).__name__}: {exc}); "
                "re-train the model with `medfusion train`."
            ) from None
        except MedfusionError as exc:
            raise ModelPackageError(f"model.json holds an invalid setting: {exc.message}") from None
        if set(self.role_specs) != set(self.roles) or not members:
            raise ModelPackageError("model.json roles and preprocessing specs disagree; "
                                    "re-train the model.")
        self.clinical_schema: dict[str, dict[str, Any]] = {}
        self.preprocessor = None
        if clinical:
            from medfusion.models.clinical import ClinicalPreprocessor

            self.clinical_schema = {k: dict(v) for k, v in clinical["schema"].items()}
            self.preprocessor = ClinicalPreprocessor.from_dict(
                clinical["preprocessor"])
        self.nets: list[torch.nn.Module] = []
        self.kernels: list[Any] = []
        for entry in members:
            prefix = str(entry["prefix"])
            net = FusionNet(self.config)
            state = {k[len(prefix):]: v for k, v in tensors.items()
                     if k.startswith(prefix) and not k.startswith(prefix + "kernel.")}
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelPackageError(
                    f"weights do not match the network in model.json ({str(exc)[:200]}); "
                    "re-train or re-export the package."
                ) from None
            net.eval()
            self.nets.append(net)
            if entry.get("kernel") is not None:
                from medfusion.models.kernel import KernelFusionClassifier

                kp = prefix + "kernel."
                arrays = {k[len(kp):]: v.numpy() for k, v in tensors.items() if k.startswith(kp)}
                self.kernels.append(KernelFusionClassifier.from_state(entry["kernel"], arrays))
        # Test-time augmentation: average over the flips the model was trained with.
        self.tta = bool(card.get("recipe", {}).get("tta", False))
        self.temperature = None
        self.conformal = None
        self.shift_reference = None
        calibration = card.get("calibration")
        if calibration:
            from medfusion.uncertainty.calibration import LogitScaler
            from medfusion.uncertainty.conformal import ConformalPredictor

            self.temperature = LogitScaler.from_dict(calibration["temperature"])
            if calibration.get("conformal"):
                self.conformal = ConformalPredictor.from_dict(calibration["conformal"])
            if calibration.get("shift"):
                from medfusion.uncertainty.shift import ShiftReference

                self.shift_reference = ShiftReference.from_dict(calibration["shift"])
        # Packages trained before the input domain was recorded have none: no range check.
        self.input_domain: InputDomain | None = None
        if card.get("input_domain"):
            try:
                self.input_domain = InputDomain.from_dict(card["input_domain"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelPackageError(
                    f"model.json has an unreadable input_domain ({type(exc).__name__}); "
                    "re-train the model with this version of medfusion."
                ) from None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> FusionModel:
        """Load a package folder (sha256-checked; pickles refused without being run)."""
        from medfusion.models.package import load_package

        directory = Path(directory)
        card, tensors = load_package(directory)
        return cls(card, tensors, directory=directory)

    @classmethod
    def from_parts(cls, card: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                   ) -> FusionModel:
        """A model from an in-memory card and weights (used by training before saving)."""
        return cls(card, tensors)

    @property
    def net(self) -> torch.nn.Module:
        """The first (or only) ensemble member's network."""
        return self.nets[0]

    @property
    def fusion(self) -> str:
        return self.config.fusion

    # -- preparation -------------------------------------------------------------------------
    def prepare(self, study: Study, *, keep_sources: bool = True) -> PreparedInputs:
        """Preprocess a study's volumes to the model grids and its clinical record to features.

        Raises :class:`ModalityMismatchError` when the study has none of the trained
        modalities; preprocessing errors (e.g. a 4D volume) propagate as MedfusionErrors.
        Roles the model was not trained on are ignored and flagged ``ROLE_NOT_USED``.
        """
        from medfusion.preprocess import prepare_volume, to_tensor_input
        from medfusion.training.dataset import clinical_present

        tensors: dict[str, np.ndarray] = {}
        prepared: dict[str, Volume] = {}
        sources: dict[str, Volume] = {}
        present: list[bool] = []
        for role in self.roles:
            grid = tuple(self.config.roles[role].grid)
            volume = study.volumes.get(role)
            if volume is None:
                tensors[role] = np.zeros((1, *grid), dtype=np.float32)
                present.append(False)
                continue
            processed = prepare_volume(volume, self.role_specs[role])
            tensor = np.asarray(to_tensor_input(processed), dtype=np.float32)
            if tensor.shape != (1, *grid):
                raise ModalityMismatchError(
                    f"`{role}` was prepared to shape {tensor.shape[1:]}, the model expects "
                    f"{grid}; check the volume is 3D (an X-ray is one 2D image)."
                )
            tensors[role] = tensor
            prepared[role] = processed
            if keep_sources:
                sources[role] = volume
            present.append(True)
        clinical = None
        if self.preprocessor is not None:
            record = _coerce_clinical(study.clinical, self.clinical_schema)
            has = clinical_present(record, list(self.clinical_schema))
            present.append(has)
            row = record if has and record is not None else dict.fromkeys(self.clinical_schema)
            clinical = np.asarray(self.preprocessor.transform([row]), dtype=np.float32)[0]
        if not any(present):
            raise ModalityMismatchError(
                f"the study has none of the modalities this model was trained on "
                f"({', '.join(self.modalities)}); give at least one of them."
            )
        flags = [f"ROLE_NOT_USED:{r}" for r in sorted(study.volumes) if r not in self.roles]
        if self.input_domain is not None:
            # Outside the acquisition or clinical range of the training split: the model has
            # never seen such an input, whatever its encoders make of it (uncertainty.domain).
            for role in self.roles:
                if role in study.volumes:
                    flags += self.input_domain.check_volume(role, study.volumes[role])
            if self.preprocessor is not None:
                flags += self.input_domain.check_clinical(record)
        return PreparedInputs(
            study_key=study.key,
            modalities=self.modalities,
            tensors=tensors,
            present=np.array(present, dtype=bool),
            clinical=clinical,
            prepared=prepared,
            sources=sources,
            flags=tuple(flags),
        )

    # -- probabilities -----------------------------------------------------------------------
    def member_outputs(self, images: Mapping[str, np.ndarray], clinical: np.ndarray | None,
                       present: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw class probabilities of every ensemble member (S, N, C) and the mean modality
        weights (N, M) (attention alphas / gates) when the head has them."""
        member_probs, member_weights = [], []
        variants = tta_variants(images) if self.tta else [images]
        for i, net in enumerate(self.nets):
            probs_v, weights_v = [], []
            for imgs in variants:
                logits, weights, embeddings = run_net(net, imgs, clinical, present)
                if self.kernels:
                    probs_v.append(np.asarray(
                        self.kernels[i].predict_proba(embeddings, present), dtype=np.float64))
                else:
                    probs_v.append(softmax(logits.astype(np.float64)))
                if weights is not None:
                    weights_v.append(weights)
            member_probs.append(np.mean(probs_v, axis=0))
            if weights_v:
                member_weights.append(np.mean(weights_v, axis=0))
        weights_mean = np.mean(member_weights, axis=0) if member_weights else None
        return np.stack(member_probs), weights_mean

    def raw_probabilities_arrays(self, images: Mapping[str, np.ndarray],
                                 clinical: np.ndarray | None, present: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities (N, C): the mean over ensemble members."""
        return self.member_outputs(images, clinical, present)[0].mean(axis=0)

    def calibrated(self, raw_probs: np.ndarray, shifts: Sequence[float] | None = None
                   ) -> np.ndarray:
        """Temperature-scaled probabilities (identity when the package has no calibration);
        given the studies' feature shifts, also distance-aware (see predict_prepared)."""
        if self.temperature is None:
            return np.asarray(raw_probs, dtype=np.float64)
        logits = np.log(np.clip(raw_probs, 1e-12, 1.0))
        probs = np.asarray(self.temperature.transform(logits), dtype=np.float64)
        if shifts is not None and self.shift_reference is not None:
            probs = self.shift_reference.adjust(probs, shifts)
        return probs

    # -- prediction --------------------------------------------------------------------------
    def predict_prepared(self, batch: Sequence[PreparedInputs], *, explain: bool = False,
                         alpha: float = 0.1) -> list[Prediction]:
        """Predictions for prepared studies (same order). ``alpha``: conformal error rate."""
        if not batch:
            return []
        if not 0.0 < alpha < 1.0:
            raise MedfusionError("alpha must be in (0, 1), e.g. 0.1 for 90% prediction sets.",
                                 code="BAD_ARGUMENT")
        images, clinical, present = stack_prepared(batch, self.roles)
        member_probs, weights = self.member_outputs(images, clinical, present)
        raw = member_probs.mean(axis=0)
        probs = self.calibrated(raw)
        uncertainty = self._uncertainty(probs, member_probs)
        # MC dropout (single-network models) and modality Shapley values: medfusion.uncertainty
        from medfusion.uncertainty.trust import trust_outputs

        trust = trust_outputs(self, images, clinical, present, probs)
        if self.shift_reference is not None and trust.feature_shift is not None:
            # Distance-aware probabilities: unchanged within the validation range, pulled
            # towards uniform beyond it (medfusion.uncertainty.shift); the class is kept.
            probs = self.shift_reference.adjust(probs, trust.feature_shift)
            uncertainty["entropy"] = self._uncertainty(probs, member_probs)["entropy"]
        if trust.mutual_info is not None:
            uncertainty["mutual_info"] = list(trust.mutual_info)
            uncertainty["prob_std"] = list(trust.prob_std or [])
        sets = (self.conformal.prediction_sets(probs, alpha=alpha)
                if self.conformal is not None else None)
        out: list[Prediction] = []
        for i, prep in enumerate(batch):
            top = int(np.argmax(probs[i]))
            mod_weights = None
            if weights is not None:
                mod_weights = {m: float(weights[i, j]) for j, m in enumerate(self.modalities)
                               if prep.present[j]}
            pset = None if sets is None else tuple(self.labels[k] for k in sets[i])
            out_of_range = any(is_input_range_flag(f) for f in prep.flags)
            if pset is not None and (out_of_range
                                     or (trust.flags and FLAG_OOD in trust.flags[i])):
                # Conformal sets assume a study exchangeable with the calibration studies;
                # one beyond their feature-shift range, or outside the acquisition range of
                # the training split, has failed that test: no commitment.
                pset = tuple(self.labels)
            explanation = self._explain(prep, top) if explain else None
            out.append(Prediction(
                study_key=prep.study_key,
                labels=self.labels,
                probabilities={lab: float(probs[i, k]) for k, lab in enumerate(self.labels)},
                raw_probabilities={lab: float(raw[i, k]) for k, lab in enumerate(self.labels)},
                predicted=self.labels[top],
                modalities_used=prep.modalities_used,
                modality_weights=mod_weights,
                entropy=uncertainty["entropy"][i],
                mutual_info=uncertainty["mutual_info"][i],
                prob_std=uncertainty["prob_std"][i],
                prediction_set=pset,
                abstain=True if out_of_range else (None if pset is None else len(pset) != 1),
                shapley=trust.shapley[i],
                explanation=explanation,
                flags=(*prep.flags, *(trust.flags[i] if trust.flags else ())),
                feature_shift=None if trust.feature_shift is None else trust.feature_shift[i],
                shift_pvalue=None if trust.shift_pvalue is None else trust.shift_pvalue[i],
            ))
        return out

    def _uncertainty(self, probs: np.ndarray, member_probs: np.ndarray
                     ) -> dict[str, list[float | None]]:
        """Entropy of the calibrated probabilities; mutual information and std across
        ensemble members when there are several (None otherwise)."""
        p = np.clip(probs, 1e-12, 1.0)
        entropy = (-(p * np.log(p)).sum(axis=1)).tolist()
        n = probs.shape[0]
        mi: list[float | None] = [None] * n
        std: list[float | None] = [None] * n
        if member_probs.shape[0] > 1:
            from medfusion.uncertainty.metrics import mutual_information, probability_std

            mi = [float(x) for x in mutual_information(member_probs)]
            spread = probability_std(member_probs)
            top = member_probs.mean(axis=0).argmax(axis=1)
            std = [float(spread[i, top[i]]) for i in range(n)]
        return {"entropy": [float(x) for x in entropy], "mutual_info": mi, "prob_std": std}

    def _explain(self, prepared: PreparedInputs, target: int) -> Any:
        try:
            from medfusion.explain import explain_prediction
        except ImportError:
            log.warning("explanations are not available in this installation")
            return None
        return explain_prediction(self, prepared, target=target)

    def predict(self, study: Study, *, explain: bool = False, alpha: float = 0.1) -> Prediction:
        """Prepare and predict one study."""
        return self.predict_prepared([self.prepare(study, keep_sources=explain)],
                                     explain=explain, alpha=alpha)[0]


# --- manifest-level prediction -----------------------------------------------------------
def _format(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.6f}"


def predict_manifest(model_dir: str | Path, manifest: str | Path, out_csv: str | Path, *,
                     explain: bool = False, saliency_dir: str | Path | None = None,
                     alpha: float = 0.1, allow_missing_clinical: bool = False) -> Path:
    """Score every row of ``manifest`` with the model in ``model_dir`` into ``out_csv``.

    Columns: ``study_id, predicted, prob_<label>... , weight_<modality>...`` (weights when the
    fusion head has them), ``raw_prob_<label>...`` (before temperature scaling),
    ``entropy``, ``mutual_info``, ``prediction_set`` (labels joined by ``|``), ``abstain``
    (``true`` when the set is not one class), ``shapley_<modality>...``, ``feature_shift``
    and ``shift_pvalue`` (docs/trust.md), ``flags`` (``|``-joined, e.g.
    ``OUT_OF_DISTRIBUTION``), and
    ``error`` (a stable error code for a row that could not be
    scored, its other cells empty; ``CLINICAL_SCHEMA`` for a row with an invalid clinical
    cell). The manifest needs ``study_id`` and may omit ``label`` and role columns (modality
    missing). A clinical column of the model that the manifest lacks is refused
    (``CLINICAL_SCHEMA``) unless ``allow_missing_clinical`` (then missing for every study,
    each row flagged ``CLINICAL_COLUMNS_MISSING``); one spelled differently (``Age``) is
    always refused. The file is written atomically.
    """
    from medfusion.io.clinical import FLAG_COLUMNS_MISSING
    from medfusion.io.keys import pseudonym
    from medfusion.training.dataset import load_input_volume
    from medfusion.training.manifest import read_manifest
    from medfusion.training.recipe import load_recipe

    model = FusionModel.load(model_dir)
    recipe = load_recipe(model.card["recipe"])
    rows = read_manifest(manifest, recipe, require_labels=False, require_columns=False,
                         allow_missing_clinical=allow_missing_clinical, bad_clinical="row")
    out_csv = Path(out_csv)
    has_weights = model.fusion in ("attention", "gated")
    header = ["study_id", "predicted", *[f"prob_{lab}" for lab in model.labels]]
    if has_weights:
        header += [f"weight_{m}" for m in model.modalities]
    header += [*[f"raw_prob_{lab}" for lab in model.labels], "entropy", "mutual_info",
               "prediction_set", "abstain", *[f"shapley_{m}" for m in model.modalities],
               "feature_shift", "shift_pvalue", "flags", "error"]
    lines: list[list[str]] = []
    writer_fn = None
    if explain and saliency_dir is not None:
        try:
            from medfusion.explain import write_explanation as writer_fn
        except ImportError:
            log.warning("explanations are not available; no saliency maps written")
    for row in rows:
        try:
            if row.clinical_error is not None:  # this study only: the others are scored
                raise ClinicalSchemaError(row.clinical_error)
            volumes = {r: load_input_volume(p) for r, p in row.paths.items() if p is not None}
            study = Study(key=pseudonym(row.study_id, prefix="st-"), volumes=volumes,
                          clinical=row.clinical)
            pred = model.predict(study, explain=explain, alpha=alpha)
            # Clinical columns accepted as absent: say so on every row they could change.
            absent_flag = [FLAG_COLUMNS_MISSING] if row.clinical_absent else []
        except MedfusionError as exc:
            log.warning("manifest line %d not scored (%s)", row.line, exc.code)
            lines.append([row.study_id, *[""] * (len(header) - 2), exc.code])
            continue
        cells = [row.study_id, pred.predicted,
                 *[_format(pred.probabilities[lab]) for lab in model.labels]]
        if has_weights:
            w = pred.modality_weights or {}
            cells += [_format(w.get(m, 0.0)) for m in model.modalities]
        shapley = pred.shapley or {}
        cells += [*[_format(pred.raw_probabilities[lab]) for lab in model.labels],
                  _format(pred.entropy), _format(pred.mutual_info),
                  "" if pred.prediction_set is None else "|".join(pred.prediction_set),
                  "" if pred.abstain is None else str(pred.abstain).lower(),
                  *[_format(shapley.get(m)) for m in model.modalities],
                  _format(pred.feature_shift), _format(pred.shift_pvalue),
                  "|".join(sorted({*pred.flags, *absent_flag})), ""]
        lines.append(cells)
        if writer_fn is not None and pred.explanation is not None:
            try:
                writer_fn(pred.explanation, Path(saliency_dir), row.study_id,
                          images=study.volumes)
            except MedfusionError as exc:
                log.warning("manifest line %d: saliency not written (%s)", row.line, exc.code)
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_csv, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(lines)
    except OSError as exc:
        raise OutputError(f"could not write the predictions CSV ({type(exc).__name__}); "
                          "check the output folder exists and is writable.") from None
    return out_csv
