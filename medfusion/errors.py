"""One exception tree for everything medfusion refuses.

Every error raised on bad input derives from :class:`MedfusionError` and carries a stable
``code`` (used in failure rows, JSON output and tests) plus a message that says what to do.
Messages never contain patient identifiers: callers pass pseudonymous names only.
"""

from __future__ import annotations


class MedfusionError(Exception):
    """Base of every error medfusion raises on bad input.

    ``code`` is stable across releases; ``message`` explains the problem and the fix.
    Subclasses fix a default code; a specific code may be given per instance.
    """

    code: str = "MEDFUSION_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# --- input discovery / file format -------------------------------------------------------
class NotDicomError(MedfusionError):
    code = "NOT_DICOM"


class NoImagesError(MedfusionError):
    code = "NO_IMAGES"


class UnsupportedInputError(MedfusionError):
    code = "UNSUPPORTED_INPUT"


class TruncatedError(MedfusionError):
    code = "TRUNCATED"


class CorruptFileError(MedfusionError):
    code = "CORRUPT"


class UnsupportedEncodingError(MedfusionError):
    code = "UNSUPPORTED_ENCODING"


class LimitExceededError(MedfusionError):
    code = "LIMIT_EXCEEDED"


class InvalidValuesError(MedfusionError):
    """NaN/Inf voxels or an all-zero decoded frame."""

    code = "INVALID_VALUES"


# --- series geometry ---------------------------------------------------------------------
class MixedSeriesError(MedfusionError):
    code = "MIXED_SERIES"


class MissingSlicesError(MedfusionError):
    code = "MISSING_SLICES"


class GeometryError(MedfusionError):
    """Geometry that cannot be represented faithfully (missing orientation, tilt/uneven
    spacing under ``strict``, inconsistent rows/columns/pixel spacing, sheared affine...)."""

    code = "GEOMETRY"


# --- preprocessing -----------------------------------------------------------------------
class PreprocessError(MedfusionError):
    """A volume that cannot be prepared for a model as asked (4D without a channel rule
    (``NOT_3D``), a map whose shape is not the processed grid's (``SHAPE_MISMATCH``), an
    ``auto`` normalisation for an unknown modality (``UNKNOWN_MODALITY``), NaN/Inf voxels
    (``INVALID_VALUES``), a singular affine (``GEOMETRY``))."""

    code = "PREPROCESS"


# --- clinical records --------------------------------------------------------------------
class ClinicalSchemaError(MedfusionError):
    code = "CLINICAL_SCHEMA"


# --- free-text notes ----------------------------------------------------------------------
class NoteError(MedfusionError):
    """A clinical note that cannot be read: not UTF-8 text (``NOTE_ENCODING``), larger than
    the note limit (``NOTE_TOO_LARGE``), or not a regular file (``NOTE_UNREADABLE``). The
    message names the role only, never the note's text."""

    code = "NOTE_UNREADABLE"


# --- models, recipes, packages -----------------------------------------------------------
class MissingExtraError(MedfusionError):
    """An optional component whose extra is not installed (the message names the extra)."""

    code = "MISSING_EXTRA"


class RecipeError(MedfusionError):
    code = "RECIPE"


class ManifestError(MedfusionError):
    code = "MANIFEST"


class ModelPackageError(MedfusionError):
    code = "MODEL_PACKAGE"


class UntrustedCheckpointError(ModelPackageError):
    code = "UNTRUSTED_CHECKPOINT"


class ModalityMismatchError(MedfusionError):
    """A study lacks every modality the model was trained on, or brings the wrong shape."""

    code = "MODALITY_MISMATCH"


# --- calibration, uncertainty, explanations ----------------------------------------------
class CalibrationError(MedfusionError):
    """Bad input to temperature scaling, conformal prediction or uncertainty estimators
    (shape mismatch, NaN, labels out of range, alpha outside (0, 1), not fitted)."""

    code = "CALIBRATION"


class ExplanationError(MedfusionError):
    """An explanation that cannot be computed (unknown role or method, no image input)."""

    code = "EXPLANATION"


# --- batch -------------------------------------------------------------------------------
class OutputError(MedfusionError):
    code = "OUTPUT"


class BudgetExceededError(MedfusionError):
    code = "BUDGET_EXCEEDED"


class UnsafePathError(MedfusionError):
    code = "UNSAFE_PATH"


# --- validation report -------------------------------------------------------------------
class ReportInputError(MedfusionError):
    """Scores, labels or a comparison file that cannot be turned into a validation report
    (missing columns, duplicate study ids, unknown labels, no scored study with a label)."""

    code = "REPORT_INPUT"
