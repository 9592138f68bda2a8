"""Failure classification shared by every DICOM reader: which exceptions are the input's
fault, and the wrapper that keeps the public loaders' contract (only ``MedfusionError``
subclasses escape on bad input, pydicom stays quiet)."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from medfusion.errors import (
    CorruptFileError,
    LimitExceededError,
    MedfusionError,
)


def _is_decoder_panic(exc: BaseException) -> bool:
    """A panic inside a Rust extension (pylibjpeg-rle and other pyo3 decoders raise
    ``pyo3_runtime.PanicException``, which derives from BaseException, not Exception)."""
    kind = type(exc)
    return kind.__name__ == "PanicException" or kind.__module__ == "pyo3_runtime"


def _is_input_failure(exc: BaseException) -> bool:
    """Whether a failure inside a parser or decoder is the input's fault: any Exception or
    a decoder panic. KeyboardInterrupt, SystemExit, GeneratorExit and other control-flow
    BaseExceptions are never swallowed."""
    return isinstance(exc, Exception) or _is_decoder_panic(exc)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a public loader quietly and keep its contract on bad input.

    pydicom warns and logs about malformed values, sometimes quoting them (a patient name
    included), so its warnings and its logger are silenced for the call. Any exception that
    is not a :class:`MedfusionError` (a decoder panic included) becomes
    ``CorruptFileError`` with code ``MALFORMED_DICOM`` (no other type escapes a loader on
    bad input); the message names the exception type, never a value or path.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("pydicom")
        was_disabled = logger.disabled
        logger.disabled = True
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except MedfusionError:
            raise
        except MemoryError:
            raise LimitExceededError(
                "not enough memory to load the image; free memory or lower the input size.",
            ) from None
        except BaseException as exc:
            if not _is_input_failure(exc):
                raise
            raise CorruptFileError(
                f"malformed DICOM input ({type(exc).__name__}): a header value or the pixel "
                "data is inconsistent in a way medfusion has no specific check for. Check "
                "the files with a DICOM validator (e.g. dciodvfy) or re-export them.",
                code="MALFORMED_DICOM",
            ) from None
        finally:
            logger.disabled = was_disabled

    return wrapper


_TRUNC_FIX = "The file is truncated or corrupt: copy it again from the source (PACS export)."
