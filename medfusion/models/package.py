"""The model package: a directory with ``model.json`` (the card) and ``weights.safetensors``.

Writing is atomic per file (a temporary file in the same directory, then ``os.replace``);
the weights are written first and ``model.json`` last, so a package whose card exists has
complete weights. The card records the weights' sha256.

Loading never executes anything from the package: ``model.json`` is parsed as JSON, the
weights are checked to *be* safetensors by their bytes (a pickle, a torch ``.pt`` zip or
anything else is refused with :class:`~medfusion.errors.UntrustedCheckpointError` before
any parsing), then their sha256 must match the card (else
:class:`~medfusion.errors.ModelPackageError`), then ``safetensors.torch.load`` parses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medfusion import __version__
from medfusion.atomic import write_bytes
from medfusion.errors import ModelPackageError, UntrustedCheckpointError

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
#: a card larger than this is not a card (it would hold data, not a description)
MAX_CARD_BYTES = 64 * 1024 * 1024
#: file names that indicate a pickle-based checkpoint someone meant us to load
_UNTRUSTED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")


def _version() -> str:
    return __version__


def _jsonable(value: Any, where: str = "card") -> Any:
    """A JSON-safe copy: tuples -> lists, numpy scalars/arrays -> Python, NaN/Inf -> None."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelPackageError(f"{where} keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist(), where)
    raise ModelPackageError(
        f"{where} holds a {type(value).__name__}, which a JSON model card cannot store"
    )


def save_package(
    directory: str | os.PathLike[str], *, card: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` (``card`` plus ``weights_sha256``
    and ``medfusion_version``) into ``directory`` (created if needed); returns its path.

    Non-finite floats in the card are stored as ``null`` (JSON has no NaN).
    """
    from safetensors.torch import save

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ModelPackageError(f"{out.name} exists and is not a directory; choose another path")
    if not isinstance(card, Mapping):
        raise ModelPackageError("card must be a dict")
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ModelPackageError("tensors must map string names to torch tensors")
    body = _jsonable(dict(card))
    # safetensors refuses shared or non-contiguous storage: give it independent copies.
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    data = save(plain)
    digest = hashlib.sha256(data).hexdigest()
    body["weights_sha256"] = digest
    body["medfusion_version"] = _version()
    text = json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / WEIGHTS_NAME, data)
    write_bytes(out / CARD_NAME, text.encode("utf-8"))
    return out


def _sniff_safetensors(data: bytes) -> None:
    """Refuse anything that is not a safetensors file, by its bytes, before parsing.

    A safetensors file is an 8-byte little-endian header length, then a JSON header. The
    structure is checked first (a valid header length may well start with byte 0x80, like a
    pickle); only what fails it is classified, for the message.
    """
    if len(data) >= 10:
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len <= len(data) - 8 and data[8:9] == b"{":
            return
    if data[:1] == b"\x80" or data[:1] in (b"(", b"c", b"]", b"}"):
        kind = "a Python pickle"
    elif data[:4] == b"PK\x03\x04":
        kind = "a zip archive (a torch .pt checkpoint?)"
    else:
        kind = "not a safetensors file"
    raise UntrustedCheckpointError(
        f"{WEIGHTS_NAME} is {kind}; it was not loaded (pickle-based checkpoints can run "
        "code). Re-export the weights with safetensors"
    )


def load_package(directory: str | os.PathLike[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a package written by :func:`save_package`: ``(card, tensors)``.

    Raises :class:`~medfusion.errors.UntrustedCheckpointError` when the weights are not a
    safetensors file (a pickle is never executed) and
    :class:`~medfusion.errors.ModelPackageError` for a missing or unreadable card, missing
    weights or a sha256 mismatch.
    """
    from safetensors.torch import load

    root = Path(directory)
    if not root.is_dir():
        raise ModelPackageError(
            "model directory not found or not a directory; pass the folder holding model.json"
        )
    card_path, weights_path = root / CARD_NAME, root / WEIGHTS_NAME
    if not weights_path.is_file():
        untrusted = sorted(
            p.suffix for p in root.iterdir() if p.suffix.lower() in _UNTRUSTED_SUFFIXES
        )
        if untrusted:
            raise UntrustedCheckpointError(
                f"the model directory holds {', '.join(untrusted)} weights but no "
                f"{WEIGHTS_NAME}; only safetensors weights are loaded (pickles can run code)"
            )
        raise ModelPackageError(f"the model directory has no {WEIGHTS_NAME}")
    if not card_path.is_file():
        raise ModelPackageError(f"the model directory has no {CARD_NAME}")
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise ModelPackageError(f"{CARD_NAME} is larger than {MAX_CARD_BYTES} bytes")

    data = weights_path.read_bytes()
    # Sniff first: a planted pickle is refused whatever the card says about its hash.
    _sniff_safetensors(data)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(
            f"{CARD_NAME} is not valid JSON ({error.__class__.__name__})"
        ) from None
    if not isinstance(card, dict):
        raise ModelPackageError(f"{CARD_NAME} must hold a JSON object")
    expected = card.get("weights_sha256")
    if not isinstance(expected, str):
        raise ModelPackageError(f"{CARD_NAME} lacks weights_sha256; re-save the package")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelPackageError(
            f"{WEIGHTS_NAME} does not match the sha256 in {CARD_NAME} "
            f"(expected {expected[:12]}..., got {actual[:12]}...): the weights were changed "
            "or damaged; restore the original package"
        )
    try:
        tensors = load(data)
    except Exception as error:  # noqa: BLE001 - safetensors' error class varies by version
        raise ModelPackageError(
            f"{WEIGHTS_NAME} could not be parsed ({error}); restore the original package"
        ) from None
    return card, dict(tensors)
