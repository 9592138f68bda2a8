"""How local worker processes are started (kept free of heavy imports).

Workers fork from a ``forkserver`` that imports torch and the loaders once
(:data:`PRELOAD`), so starting or replacing a worker takes milliseconds. The server's own
start-up (importing torch) is the slow part: :func:`start_server` launches it without
waiting, so ``medfusion score`` can call it before it imports anything heavy itself and the
server's imports overlap the parent's on another core.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
from typing import Any

#: Imported once by the fork server, so every worker starts with them loaded. MONAI is not
#: among them: the default encoder does not need it and workers never build networks
#: that do (they only load and preprocess).
PRELOAD = ["torch", "medfusion.scoring.pool", "medfusion.inference",
           "medfusion.io.study", "medfusion.io.volume", "medfusion.preprocess"]


def context(start_method: str | None = None) -> Any:
    """``forkserver`` where available (Linux, macOS), ``spawn`` elsewhere. Never plain
    ``fork`` of the parent (its torch threads and open files would be copied)."""
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_server() -> bool:
    """Launch the fork server now (it imports :data:`PRELOAD` in the background); returns
    False where there is no fork server. Later :class:`~medfusion.scoring.pool.LocalPool`
    workers fork from it."""
    if "forkserver" not in mp.get_all_start_methods():
        return False
    context("forkserver")
    forkserver.ensure_running()
    return True
