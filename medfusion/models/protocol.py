"""What the layers above need from a trained model, declared instead of probed.

:class:`TrainedModel` is the contract ``explain`` and ``inference`` program against; the
loaded package (:class:`medfusion.inference.FusionModel`) satisfies it, and so can any
object a test or a benchmark builds around trained networks. :func:`temperature_of` and
:func:`base_rate` are the one way to read the calibration temperature and a class's
training share from such a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from medfusion.models.card import ModelCard
from medfusion.models.clinical import ClinicalPreprocessor
from medfusion.models.kernel import KernelFusionClassifier
from medfusion.models.net import FusionNet


@runtime_checkable
class HasTemperature(Protocol):
    """A fitted calibration scaler (``uncertainty.calibration.LogitScaler``)."""

    @property
    def temperature(self) -> float: ...


@runtime_checkable
class TrainedModel(Protocol):
    """Trained networks and what is needed to explain or score their outputs.

    ``nets``: the ensemble members (one or more); ``kernels``: one SVM per member for kernel
    fusion, else empty; ``modalities``: trained roles sorted, then ``clinical``;
    ``temperature``: the calibration scaler or None; ``preprocessor``: the fitted clinical
    preprocessing or None; ``card``: the parsed model card.
    """

    labels: tuple[str, ...]
    modalities: tuple[str, ...]
    nets: Sequence[FusionNet]
    kernels: Sequence[KernelFusionClassifier]
    temperature: HasTemperature | None
    preprocessor: ClinicalPreprocessor | None
    card: ModelCard


def temperature_of(model: TrainedModel) -> float:
    """The calibration temperature (1.0 for an uncalibrated model)."""
    return 1.0 if model.temperature is None else float(model.temperature.temperature)


def base_rate(model: TrainedModel, target: int) -> float | None:
    """Class ``target``'s share of the training split, from the model card (else None)."""
    try:
        label = model.labels[int(target)]
    except (IndexError, TypeError, ValueError):
        return None
    return model.card.train_share(label)
