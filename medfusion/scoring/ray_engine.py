"""The ``prepare`` half on a Ray cluster (``--engine ray``).

Each study is one Ray task (``num_cpus=1``, no retries: a study that kills its worker is a
failure row, not an endless retry). Tasks return the same records as local workers, and
inference stays in the driver, so rows are identical to the local engine.

Without ``ray_address`` a local Ray instance is started (``num_cpus`` = workers, no
dashboard) and shut down at the end. With an address (``auto``, ``ray://head:10001``...) the
driver joins an existing cluster: the studies folder and the model folder must then be
visible at the same path on every node (a shared filesystem); see docs/scoring.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

from medfusion.errors import MedfusionError
from medfusion.io.dicom.parallel import ENV as DECODE_ENV
from medfusion.scoring.pool import ScorerFactory, Task, _silence_process, budget_failure
from medfusion.scoring.scorer import WarmsUp, failure, prepare_task

# One scorer per Ray worker process and model folder: the model is read once, not per task.
_SCORERS: dict[str, Any] = {}
_SILENCED = False


def _ray_prepare(
    factory: ScorerFactory,
    model_dir: str,
    task: Task,
    memory_budget_mb: float | None,
) -> dict[str, Any]:
    """Body of one Ray task: the same work as a local worker does for one study."""
    global _SILENCED
    import warnings

    if not _SILENCED:
        _silence_process()  # Ray worker logs are files on every node: keep them PHI-free
        _SILENCED = True
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:  # pragma: no cover
            pass
        # One core per task, as Ray counts it: no decoding processes of its own.
        os.environ[DECODE_ENV] = "1"
    warnings.simplefilter("ignore")
    ref, clinical, explain = task
    scorer = _SCORERS.get(model_dir)
    if scorer is None:
        try:
            scorer = factory(model_dir)
        except Exception as error:  # noqa: BLE001 - becomes a failure row
            return {"study_id": ref.study_id, "key": ref.key, "ok": False,
                    "failure": failure(ref, "load", error)}
        if memory_budget_mb is not None and isinstance(scorer, WarmsUp):
            scorer.warm_up()  # one-time allocations are not this study's
        _SCORERS[model_dir] = scorer
    record = prepare_task(scorer, ref, clinical, explain=explain,
                          memory_budget_mb=memory_budget_mb)
    record.pop("recycle", None)
    return record


class RayPreparer:
    """Bounded set of in-flight Ray tasks; budgets enforced from the driver."""

    def __init__(
        self,
        n: int,
        model_dir: str,
        *,
        factory: ScorerFactory,
        ray_address: str | None = None,
        time_budget_s: float | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise MedfusionError(
                "--engine ray needs Ray: pip install 'medfusion[ray]' (or use --engine local)",
                code="RAY_MISSING",
            ) from None
        self.ray = ray
        self.owns = False
        if not ray.is_initialized():
            try:
                if ray_address:
                    ray.init(address=ray_address, log_to_driver=False, logging_level="error")
                else:
                    ray.init(
                        num_cpus=max(1, n),
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level="error",
                        configure_logging=False,
                    )
                    self.owns = True
            except Exception as error:  # noqa: BLE001 - a clean fatal error instead
                raise MedfusionError(
                    f"could not start or join Ray ({type(error).__name__}); check "
                    "--ray-address or use --engine local",
                    code="RAY_UNAVAILABLE",
                ) from None
        self.n = max(1, n) if not ray_address else max(1, n, int(ray.cluster_resources().get(
            "CPU", 1)))
        self.model_dir = os.path.abspath(model_dir)
        self.factory = factory
        self.time_budget_s = time_budget_s
        self.memory_budget_mb = memory_budget_mb
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_ray_prepare)
        self.inflight: dict[Any, tuple[Task, float]] = {}
        self.recycled = 0

    def capacity(self) -> int:
        return max(0, self.n - len(self.inflight))

    def busy(self) -> int:
        return len(self.inflight)

    def submit(self, task: Task) -> None:
        ref = self.remote.remote(self.factory, self.model_dir, task, self.memory_budget_mb)
        self.inflight[ref] = (task, time.monotonic())

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        if not self.inflight:
            return []
        ray = self.ray
        done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        # Collect everything else that is already finished, without waiting again.
        more, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        out: list[dict[str, Any]] = []
        for ref in {*done, *more}:
            task, _start = self.inflight.pop(ref)
            try:
                out.append(ray.get(ref))
            except Exception:  # noqa: BLE001 - the worker died (OOM, native crash...)
                record = budget_failure(task[0], "the Ray worker died")
                record["failure"]["code"] = "WORKER_CRASHED"
                record["failure"]["message"] = (
                    "the Ray worker died while loading this study (out of memory or a crash "
                    "in a decoder); check the input or the memory available"
                )
                out.append(record)
        now = time.monotonic()
        if self.time_budget_s:
            for ref, (task, start) in list(self.inflight.items()):
                if now - start > self.time_budget_s:
                    ray.cancel(ref, force=True)  # kills that worker; Ray starts another
                    del self.inflight[ref]
                    self.recycled += 1
                    out.append(
                        budget_failure(task[0], f"over the {self.time_budget_s:g} s time budget")
                    )
        return out

    def close(self) -> None:
        for ref in list(self.inflight):
            self.ray.cancel(ref, force=True)
        self.inflight.clear()
        if self.owns:
            self.ray.shutdown()
