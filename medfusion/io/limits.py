"""Size limits checked from headers, before any pixel buffer is allocated.

A header can declare any size (DICOM Rows x Columns x NumberOfFrames, NIfTI dims); reading
it blindly lets one crafted file exhaust memory. Loaders call :func:`check_declared_size`
with the declared shape first and allocate only when it passes.

The default cap is 2 GiB of float32 output (536,870,912 voxels); set the environment
variable ``MEDFUSION_MAX_BYTES`` (bytes, e.g. ``8589934592``) to change it for a site.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from medfusion.errors import LimitExceededError

#: Default cap on the float32 array a loader returns: 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Bytes per voxel of every loader's output (float32).
OUTPUT_BYTES_PER_VOXEL = 4


def max_bytes() -> int:
    """The active cap in bytes (``MEDFUSION_MAX_BYTES`` when set to a positive integer)."""
    env = os.environ.get("MEDFUSION_MAX_BYTES", "").strip()
    if env:
        try:
            value = int(float(env))
        except ValueError:
            value = 0
        if value > 0:
            return value
    return DEFAULT_MAX_BYTES


def max_voxels() -> int:
    """The active cap in voxels of float32 output."""
    return max_bytes() // OUTPUT_BYTES_PER_VOXEL


# Module-level defaults for callers that want a constant (read at import time).
MAX_BYTES = max_bytes()
MAX_VOXELS = max_voxels()


def check_declared_size(shape: Sequence[int], bytes_per_voxel: float, what: str) -> int:
    """Refuse a declared shape before allocating it; return the voxel count when it passes.

    ``bytes_per_voxel`` is the size of the *stored* sample (e.g. 2 for 16-bit DICOM); the
    check applies to whichever is larger, the stored bytes or the float32 output.
    ``what`` names the input pseudonymously (e.g. ``"DICOM file 3 of series se-1a2b"``):
    it goes into the message, so never pass a raw path or patient identifier.
    """
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise LimitExceededError(
            f"{what} declares a negative dimension {tuple(dims)}; the header is corrupt. "
            "Re-export the image from its source.",
        )
    voxels = math.prod(dims) if dims else 0
    need = voxels * max(float(bytes_per_voxel), float(OUTPUT_BYTES_PER_VOXEL))
    cap = max_bytes()
    if need > cap:
        raise LimitExceededError(
            f"{what} declares shape {tuple(dims)} ({need / 1024**3:.1f} GiB as float32), over "
            f"the limit of {cap / 1024**3:.1f} GiB. If the image is genuine, raise the limit "
            "with the environment variable MEDFUSION_MAX_BYTES (bytes).",
        )
    return voxels
