"""Weight averaging during training (``ema_epochs``): validation scores, and an epoch keeps,
the moving average of the weights, not the optimizer's last noisy step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from medfusion.errors import RecipeError
from medfusion.testing.synthetic import write_cohort
from medfusion.training.recipe import load_recipe
from medfusion.training.trainer import train

RECIPE = {"labels": ["normal", "abnormal"], "modalities": {"ct": {"grid": [16, 16, 16]}},
          "epochs": 4, "batch_size": 8, "augment": "none"}


def _weights(model: Path) -> dict[str, np.ndarray]:
    """Learnt parameters only: BatchNorm statistics follow the data even at a zero step."""
    return {k: v for k, v in load_file(model / "weights.safetensors").items()
            if np.issubdtype(v.dtype, np.floating) and "running_" not in k}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_recipe_bounds() -> None:
    assert load_recipe({**RECIPE}).ema_epochs == 2.0  # the default
    assert load_recipe({**RECIPE, "ema_epochs": 0}).ema_epochs == 0.0
    with pytest.raises(RecipeError, match="ema_epochs"):
        load_recipe({**RECIPE, "ema_epochs": -1})


def test_the_kept_network_is_the_average_and_reruns_are_identical(tmp_path: Path) -> None:
    cohort = write_cohort(tmp_path / "c", 40, seed=5, roles=("ct",), formats={"ct": "nifti"})

    def run(name: str, **change: object) -> dict[str, np.ndarray]:
        out = train({**RECIPE, **change}, cohort.manifest, tmp_path / name, seed=0,
                    progress=False)
        return _weights(out)

    # A learning rate of 1e-7 leaves the seeded initial weights as they were.
    start = run("start", learning_rate=1e-7, ema_epochs=0)
    plain = run("plain", ema_epochs=0)
    # An average over 100 epochs of steps stays near where it began (the weights after the
    # first step: the average starts as a copy) while the optimizer walks on...
    slow = run("slow", ema_epochs=100)
    assert _distance(slow, start) < 0.5 * _distance(plain, start)
    # ...and a 2-epoch average is a network of its own, reproducible to the byte.
    averaged = run("avg", ema_epochs=2)
    assert _distance(averaged, plain) > 0
    again = run("avg2", ema_epochs=2)
    assert all(np.array_equal(averaged[k], again[k]) for k in averaged)
