"""Compressed frames of one series decoded in several processes.

pydicom's JPEG 2000 (openjpeg) and JPEG-LS (libjpeg) plugins hold the GIL while they decode
(measured: a Python thread gets 17-25% of its free rate beside them), so threads cannot
spread one series over the cores; processes can. A series qualifies when its files are
compressed, there are at least :data:`MIN_FILES` of them and :func:`decode_processes` allows
more than one process: the ``medfusion`` command does (``MEDFUSION_DECODE_PROCESSES=auto``),
library callers opt in with that variable. Inside a daemon process (a ``medfusion score``
worker: the batch already keeps the cores busy) decoding stays serial.

The decoders stay pydicom's (the same ``_read_stored`` runs in each process). Any failure
in the pool returns None and the caller decodes serially, which raises the exact typed
error the serial reader gives for that file.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless

from medfusion.io.dicom.headers import _FileHeader
from medfusion.io.dicom.pixels import _read_stored

MIN_FILES = 8  # below this the pool's start-up and transfers cost more than they save
ENV = "MEDFUSION_DECODE_PROCESSES"
#: transfer syntaxes whose pydicom decoders hold the GIL and are slow enough to spread:
#: JPEG 2000 (openjpeg) and JPEG-LS (libjpeg), lossless and lossy
GIL_BOUND = frozenset({JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless})

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0


def decode_processes() -> int:
    """How many processes may decode one series here (1 = serial).

    ``MEDFUSION_DECODE_PROCESSES``: unset or ``1`` serial (the library default: a pool's
    processes import the caller's ``__main__`` module, which runs a script's top-level code
    again unless it is guarded by ``if __name__ == "__main__"``), ``auto`` one per core this
    process may use (at most 8; the ``medfusion`` command sets it), or a number. Always
    serial inside a daemon process (a ``medfusion score`` worker)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value or mp.current_process().daemon:
        return 1
    if value == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 8))
    try:
        return max(1, int(value))
    except ValueError:
        return 1


def _executor(n: int) -> ProcessPoolExecutor:
    """One pool per process, kept for later series (its start-up is paid once)."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            _pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(method))
            _pool_size = n
        return _pool


def _shutdown() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None


atexit.register(_shutdown)


def _decode_chunk(headers: Sequence[_FileHeader], what: str,
                  strict: bool) -> list[tuple[np.ndarray, bool]]:
    return [_read_stored(h, what, strict=strict) for h in headers]


def decode_parallel(headers: Sequence[_FileHeader], what: str, *,
                    strict: bool) -> list[tuple[np.ndarray, bool]] | None:
    """``_read_stored`` of every header, spread over processes; None when the series does
    not qualify or anything went wrong (the caller then decodes serially)."""
    n = decode_processes()
    if n < 2 or len(headers) < MIN_FILES:
        return None
    if any(h.transfer_syntax not in GIL_BOUND for h in headers):
        # Uncompressed files are read faster in place than shipped back; RLE decodes fast
        # and releases the GIL (measured: shipping the frames back costs more than it saves).
        return None
    per = -(-len(headers) // (4 * n))  # a few chunks per process evens out slow frames
    chunks = [list(headers[i:i + per]) for i in range(0, len(headers), per)]
    try:
        pool = _executor(n)
        results = pool.map(_decode_chunk, chunks, [what] * len(chunks),
                           [strict] * len(chunks))
        return [item for chunk in results for item in chunk]
    except Exception:  # noqa: BLE001 - any failure: serial decoding gives the typed error
        return None
