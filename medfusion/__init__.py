"""medfusion: multimodal medical-imaging diagnosis you can trust and check.

The public API is imported lazily so that ``import medfusion`` (and the CLI's ``inspect``)
stay fast and do not pull in torch until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS = {
    "Volume": "medfusion.types:Volume",
    "Study": "medfusion.types:Study",
    "Finding": "medfusion.types:Finding",
    "Prediction": "medfusion.types:Prediction",
    "Explanation": "medfusion.types:Explanation",
    "MedfusionError": "medfusion.errors:MedfusionError",
    "load_volume": "medfusion.io.volume:load_volume",
    "load_study": "medfusion.io.study:load_study",
    "read_clinical_csv": "medfusion.io.clinical:read_clinical_csv",
    "ClinicalSchema": "medfusion.io.clinical:ClinicalSchema",
    "FusionModel": "medfusion.inference.model:FusionModel",
    "train": "medfusion.training.trainer:train",
    "score_folder": "medfusion.scoring.engine:score_folder",
    "validation_report": "medfusion.report.builder:validation_report",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'medfusion' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
