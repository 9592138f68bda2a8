"""The model card (``model.json``) as a typed object.

The trainer writes the card as JSON; :meth:`ModelCard.from_dict` is the one place that reads
it back. It checks the format version first (a package written by a newer medfusion, or
something that is not a medfusion package, is refused with a message naming the version),
then parses the parts prediction needs into typed fields. Everything else stays available,
as written, through ``card["key"]`` / :meth:`ModelCard.get` (training history, metrics...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from medfusion.errors import MedfusionError, ModelPackageError
from medfusion.models.net import NetConfig
from medfusion.preprocess import RoleSpec

#: the format name and the newest version this medfusion reads and writes
FORMAT_NAME = "medfusion-model"
FORMAT_VERSION = 1
CARD_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
_FORMAT = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)/(?P<version>\d+)$")


def check_format(value: Any) -> int:
    """The version of a card's ``format`` value; ModelPackageError when this medfusion
    cannot read it (not a medfusion card, or a newer version)."""
    match = _FORMAT.match(value) if isinstance(value, str) else None
    if match is None or match["name"] != FORMAT_NAME:
        shown = value if isinstance(value, str) and len(value) <= 64 else type(value).__name__
        raise ModelPackageError(
            f"model.json has format {shown!r}, not {FORMAT_NAME}/<version>; this folder is "
            "not a medfusion model package."
        )
    version = int(match["version"])
    if version < 1 or version > FORMAT_VERSION:
        raise ModelPackageError(
            f"model.json has format version {version} ({value}); this medfusion reads "
            f"version {FORMAT_VERSION} ({CARD_FORMAT}). Upgrade medfusion to load it."
        )
    return version


@dataclass(frozen=True)
class ClinicalCard:
    """The clinical branch: the schema trained with, and the fitted preprocessing."""

    schema: dict[str, dict[str, Any]]
    preprocessor: dict[str, Any]


@dataclass(frozen=True)
class MemberCard:
    """One ensemble member: its weights' name prefix and, for kernel fusion, the SVM state."""

    prefix: str
    kernel: dict[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class ModelCard(Mapping[str, Any]):
    """A parsed ``model.json``. Also a read-only mapping of the card as written."""

    format_version: int
    labels: tuple[str, ...]
    net: NetConfig
    role_specs: dict[str, RoleSpec]
    members: tuple[MemberCard, ...]
    clinical: ClinicalCard | None
    recipe: dict[str, Any]
    calibration: dict[str, Any] | None
    input_domain: dict[str, Any] | None
    data: dict[str, Any]
    #: text role -> its note tokenizer (``NoteTokenizer.to_dict``: the fitted vocabulary as
    #: the tokenizers library's JSON, ``min_patients`` k); empty without text roles
    text: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, require_format: bool = True) -> ModelCard:
        """Parse a card. ``require_format=False`` accepts a card without ``format`` (one
        being assembled in memory by the trainer); a ``format`` present is always checked.
        Raises ModelPackageError."""
        if not isinstance(data, Mapping):
            raise ModelPackageError("model.json must hold a JSON object.")
        if "format" in data or require_format:
            if "format" not in data:
                raise ModelPackageError(
                    "model.json has no format version; re-train the model with "
                    "`medfusion train`."
                )
            version = check_format(data["format"])
        else:
            version = FORMAT_VERSION
        try:
            labels = tuple(str(x) for x in data["labels"])
            net = NetConfig.from_dict(data["net"])
            role_specs = {str(r): RoleSpec.from_dict(d) for r, d in data["role_specs"].items()}
            members = tuple(MemberCard(prefix=str(m["prefix"]), kernel=m.get("kernel"))
                            for m in data["members"])
            clinical_raw = data.get("clinical")
            clinical = None
            if clinical_raw:
                clinical = ClinicalCard(
                    schema={str(k): dict(v) for k, v in clinical_raw["schema"].items()},
                    preprocessor=dict(clinical_raw["preprocessor"]))
            recipe = dict(data.get("recipe") or {})
            text = {str(r): dict(d) for r, d in (data.get("text") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelPackageError(
                f"model.json is incomplete or malformed ({type(exc).__name__}: {exc}); "
                "re-train the model with `medfusion train`."
            ) from None
        except MedfusionError as exc:
            raise ModelPackageError(f"model.json holds an invalid setting: {exc.message}") from None
        if set(role_specs) != set(net.roles) or not members:
            raise ModelPackageError("model.json roles and preprocessing specs disagree; "
                                    "re-train the model.")
        if set(text) != set(net.texts):
            raise ModelPackageError("model.json text roles and note tokenizers disagree; "
                                    "re-train the model.")
        return cls(
            text=text,
            format_version=version, labels=labels, net=net, role_specs=role_specs,
            members=members, clinical=clinical, recipe=recipe,
            calibration=data.get("calibration") or None,
            input_domain=data.get("input_domain") or None,
            data=dict(data),
        )

    # -- derived ------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.net.roles)

    @property
    def text_roles(self) -> tuple[str, ...]:
        """The text (note) roles, sorted."""
        return tuple(self.net.texts)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.net.modalities)

    @property
    def tta(self) -> bool:
        """Test-time augmentation: average over the flips the model was trained with."""
        return bool(self.recipe.get("tta", False))

    @property
    def uses_clinical(self) -> bool:
        """Whether the recipe declared clinical variables."""
        return bool(self.recipe.get("clinical"))

    def train_share(self, label: str) -> float | None:
        """``label``'s share of the training split, from the card (None when unrecorded)."""
        try:
            counts = self.data["training"]["splits"]["train"]["labels"]
            total = sum(int(v) for v in counts.values())
            return float(counts[label]) / total if total > 0 else None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """The card as written (a copy)."""
        return dict(self.data)

    # -- Mapping over the card as written -----------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)
