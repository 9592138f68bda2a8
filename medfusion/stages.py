"""Where one study's time goes: wall-clock seconds per named stage.

A caller opens a :func:`collect` scope around the work for one study; code below it marks
its parts with :func:`timed` (the DICOM and NIfTI readers mark ``decode``, the inference
path marks ``explain``). Outside a scope :func:`timed` costs one context-variable lookup
and records nothing, so library calls made by users pay nothing for it.

The stages a scoring run reports (``run.json``, ``docs/scoring.md``):

* ``read``: finding and hashing the study's files, parsing headers, assembling the stack;
* ``decode``: reading pixel data and decoding it to real values (compressed syntaxes are
  decoded here);
* ``preprocess``: resampling and normalising to the model grid;
* ``infer``: the model's forward passes, calibration and uncertainty;
* ``explain``: saliency (Grad-CAM) with ``--explain``;
* ``write``: saliency files and DICOM result objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["STAGES", "collect", "timed"]

STAGES = ("read", "decode", "preprocess", "infer", "explain", "write")

_current: ContextVar[dict[str, float] | None] = ContextVar("medfusion_stage_seconds",
                                                            default=None)


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """A scope whose :func:`timed` sections add their seconds to the yielded dict."""
    seconds: dict[str, float] = {}
    token = _current.set(seconds)
    try:
        yield seconds
    finally:
        _current.reset(token)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the wall-clock time of the block to ``stage`` in the enclosing :func:`collect`
    scope (nothing when there is none). Time is added even when the block raises."""
    seconds = _current.get()
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
