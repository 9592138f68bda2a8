"""FusionModel: a trained model package, loaded and ready to predict.

A package (written by :func:`medfusion.training.trainer.train`) is a folder with
``model.json`` (the card, parsed into a :class:`~medfusion.models.card.ModelCard`: recipe,
labels, network config, preprocessing spec per role, fitted clinical preprocessing,
calibration, metrics) and ``weights.safetensors``; loading goes through
:func:`medfusion.models.package.load_package`, which checks the sha256 and refuses pickles
without running them, then the card's format version is checked.

Prediction is split in two so a batch scorer can parallelise the expensive half:

* :meth:`FusionModel.prepare` (in worker processes): a Study's volumes -> small model tensors
  (:class:`~medfusion.inference.prepared.PreparedInputs`), plus the prepared/source Volumes
  needed to map explanations back;
* :meth:`FusionModel.predict_prepared` (in the parent): a batch of PreparedInputs ->
  :class:`~medfusion.types.Prediction` objects (calibrated + raw probabilities, modality
  weights, uncertainty, conformal set, optional explanation).

:meth:`FusionModel.predict` does both for one study.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.errors import MedfusionError, ModalityMismatchError, ModelPackageError
from medfusion.explain.api import DEFAULT_CAM_METHOD, explain_prediction
from medfusion.inference.prepared import PreparedInputs, stack_prepared
from medfusion.inference.trust import trust_outputs
from medfusion.io.clinical import SCHEMA_KEYS, validate_record
from medfusion.io.notes import NOTE_EMPTY, check_note_text
from medfusion.models.card import ModelCard
from medfusion.models.clinical import ClinicalPreprocessor, clinical_present
from medfusion.models.kernel import KernelFusionClassifier
from medfusion.models.net import FusionNet, run_net, tta_variants
from medfusion.models.package import load_package
from medfusion.models.text import NoteTokenizer
from medfusion.numerics import softmax
from medfusion.preprocess import prepare_volume, to_tensor_input
from medfusion.stages import timed
from medfusion.types import Explanation, Prediction, Study, Volume
from medfusion.uncertainty.calibration import LogitScaler
from medfusion.uncertainty.conformal import ConformalPredictor
from medfusion.uncertainty.domain import InputDomain, is_input_range_flag
from medfusion.uncertainty.metrics import mutual_information, probability_std
from medfusion.uncertainty.shift import FLAG_OOD, ShiftReference

log = logging.getLogger("medfusion.inference")

#: a note longer than the model's ``max_tokens`` (its first tokens were used)
FLAG_NOTE_TRUNCATED = "NOTE_TRUNCATED"
#: a note whose tokens are mostly outside the vocabulary fitted on the training notes
FLAG_NOTE_UNFAMILIAR = "NOTE_UNFAMILIAR"
UNKNOWN_SHARE = 0.5


def _coerce_clinical(record: Mapping[str, Any] | None, schema: Mapping[str, Mapping[str, Any]]
                     ) -> dict[str, Any] | None:
    """The study's clinical values for the model's columns: numbers as float, None missing.

    Validated with the same rules as the clinical CSV reader (missing tokens, ranges, levels,
    a re-spelled key such as ``Age`` refused), so a record given in Python means what the
    same cells would mean in a file. Raises ClinicalSchemaError."""
    if record is None:
        return None
    # A card may keep keys of its own next to the schema's; only the schema's are checked.
    declared = {name: {k: v for k, v in spec.items() if k in SCHEMA_KEYS}
                for name, spec in schema.items()}
    return validate_record(record, declared)


# --- the model ---------------------------------------------------------------------------
class FusionModel:
    """A loaded model package. Build with :meth:`load` (from a folder)."""

    def __init__(self, card: ModelCard, tensors: Mapping[str, torch.Tensor],
                 directory: Path | None = None, *, networks: bool = True) -> None:
        self.card = card
        self.directory = directory
        self.labels: tuple[str, ...] = card.labels
        self.config = card.net
        self.roles: tuple[str, ...] = card.roles
        #: text (note) roles and their tokenizers (the card's fitted vocabularies)
        self.text_roles: tuple[str, ...] = card.text_roles
        self.tokenizers = {r: NoteTokenizer.from_dict(card.text[r]) for r in self.text_roles}
        #: every role with an input tensor: imaging roles, then text roles
        self.input_roles: tuple[str, ...] = (*self.roles, *self.text_roles)
        self.modalities: tuple[str, ...] = card.modalities
        self.role_specs = dict(card.role_specs)
        self.clinical_schema: dict[str, dict[str, Any]] = {}
        self.preprocessor: ClinicalPreprocessor | None = None
        if card.clinical is not None:
            self.clinical_schema = {k: dict(v) for k, v in card.clinical.schema.items()}
            self.preprocessor = ClinicalPreprocessor.from_dict(card.clinical.preprocessor)
        self.nets: list[FusionNet] = []
        self.kernels: list[KernelFusionClassifier] = []
        # Without networks the model can prepare studies (scoring workers) but not predict:
        # building them costs seconds of start-up (encoder libraries) a worker never uses.
        for entry in card.members if networks else ():
            prefix = entry.prefix
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
            if entry.kernel is not None:
                kp = prefix + "kernel."
                arrays = {k[len(kp):]: v.numpy() for k, v in tensors.items() if k.startswith(kp)}
                self.kernels.append(KernelFusionClassifier.from_state(entry.kernel, arrays))
        self.tta = card.tta
        self.temperature: LogitScaler | None = None
        self.conformal: ConformalPredictor | None = None
        self.shift_reference: ShiftReference | None = None
        calibration = card.calibration
        if calibration:
            self.temperature = LogitScaler.from_dict(calibration["temperature"])
            if calibration.get("conformal"):
                self.conformal = ConformalPredictor.from_dict(calibration["conformal"])
            if calibration.get("shift"):
                self.shift_reference = ShiftReference.from_dict(calibration["shift"])
        # Packages trained before the input domain was recorded have none: no range check.
        self.input_domain: InputDomain | None = None
        if card.input_domain:
            try:
                self.input_domain = InputDomain.from_dict(card.input_domain)
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelPackageError(
                    f"model.json has an unreadable input_domain ({type(exc).__name__}); "
                    "re-train the model with this version of medfusion."
                ) from None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, *, networks: bool = True) -> FusionModel:
        """Load a package folder (sha256-checked; pickles refused without being run; a card
        of an unknown or newer format refused with ModelPackageError). With
        ``networks=False`` the networks are not built: the model prepares studies
        (:meth:`prepare`) and refuses to predict."""
        directory = Path(directory)
        data, tensors = load_package(directory)
        return cls(ModelCard.from_dict(data), tensors, directory=directory, networks=networks)

    @classmethod
    def from_parts(cls, card: Mapping[str, Any] | ModelCard,
                   tensors: Mapping[str, torch.Tensor]) -> FusionModel:
        """A model from an in-memory card and weights (used by training before saving; the
        card may lack ``format`` there, it is this version's)."""
        if not isinstance(card, ModelCard):
            card = ModelCard.from_dict(card, require_format=False)
        return cls(card, tensors)

    @property
    def net(self) -> FusionNet:
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
        flags: list[str] = []
        for role in self.text_roles:
            tokenizer = self.tokenizers[role]
            text = study.notes.get(role)
            text = None if text is None else check_note_text(text, role)
            if text is None:
                tensors[role] = np.zeros(tokenizer.max_tokens, dtype=np.float32)
                present.append(False)
                continue
            ids, n_tokens, n_unknown = tokenizer.encode_counted(text)
            tensors[role] = ids
            present.append(True)
            if n_tokens > tokenizer.max_tokens:
                flags.append(f"{FLAG_NOTE_TRUNCATED}:{role}")
            if n_unknown > UNKNOWN_SHARE * min(n_tokens, tokenizer.max_tokens):
                flags.append(f"{FLAG_NOTE_UNFAMILIAR}:{role}")
        flags += [f"{NOTE_EMPTY}:{f.details.get('role')}" for f in study.issues
                  if f.code == NOTE_EMPTY and f.details.get("role") in self.text_roles]
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
        flags += [f"ROLE_NOT_USED:{r}" for r in sorted({*study.volumes, *study.notes})
                  if r not in self.input_roles]
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
                         alpha: float = 0.1, cam_method: str = DEFAULT_CAM_METHOD
                         ) -> list[Prediction]:
        """Predictions for prepared studies (same order). ``alpha``: conformal error rate;
        ``cam_method``: ``occlusion``, ``gradcam`` or ``gradcam++`` saliency (with
        ``explain``)."""
        if not self.nets:
            raise ModelPackageError("this model was loaded with networks=False: it prepares "
                                    "studies but cannot predict; load it with networks=True")
        if not batch:
            return []
        if not 0.0 < alpha < 1.0:
            raise MedfusionError("alpha must be in (0, 1), e.g. 0.1 for 90% prediction sets.",
                                 code="BAD_ARGUMENT")
        images, clinical, present = stack_prepared(batch, self.input_roles)
        member_probs, weights = self.member_outputs(images, clinical, present)
        raw = member_probs.mean(axis=0)
        probs = self.calibrated(raw)
        # MC dropout (single-network models), modality Shapley values, feature shift
        trust = trust_outputs(self, images, clinical, present, probs,
                              shift_reference=self.shift_reference)
        if self.shift_reference is not None and trust.feature_shift is not None:
            # Distance-aware probabilities: unchanged within the validation range, pulled
            # towards uniform beyond it (medfusion.uncertainty.shift); the class is kept.
            probs = self.shift_reference.adjust(probs, trust.feature_shift)
        uncertainty = self._uncertainty(probs, member_probs)
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
            explanation = self._explain(prep, top, cam_method) if explain else None
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
            mi = [float(x) for x in mutual_information(member_probs)]
            spread = probability_std(member_probs)
            top = member_probs.mean(axis=0).argmax(axis=1)
            std = [float(spread[i, top[i]]) for i in range(n)]
        return {"entropy": [float(x) for x in entropy], "mutual_info": mi, "prob_std": std}

    def _explain(self, prepared: PreparedInputs, target: int,
                 method: str = DEFAULT_CAM_METHOD) -> Explanation:
        with timed("explain"):
            return explain_prediction(self, prepared, target=target, method=method)

    def predict(self, study: Study, *, explain: bool = False, alpha: float = 0.1,
                cam_method: str = DEFAULT_CAM_METHOD) -> Prediction:
        """Prepare and predict one study."""
        return self.predict_prepared([self.prepare(study, keep_sources=explain)],
                                     explain=explain, alpha=alpha, cam_method=cam_method)[0]
