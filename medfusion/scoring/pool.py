"""Where the ``prepare`` half runs: inline, in local worker processes, or on Ray.

Every preparer offers the same small interface to the engine loop:

* ``capacity()`` how many more tasks it accepts now (bounded: memory stays flat);
* ``submit(task)`` hand over one ``(StudyRef, clinical record)``;
* ``poll(timeout)`` finished records (see :func:`medfusion.scoring.scorer.prepare_task`),
  including budget and crash failures it produced itself;
* ``close()``.

The local pool owns its processes directly (``multiprocessing`` with the ``spawn`` start
method, one pipe per worker) rather than using ``ProcessPoolExecutor``: a study over its time
or memory budget must be killed *alone* and its worker replaced while the others carry on,
which an executor cannot do without breaking the whole pool.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from medfusion.errors import MedfusionError, ModelPackageError
from medfusion.scoring.discovery import StudyRef
from medfusion.scoring.procs import context
from medfusion.scoring.scorer import Scorer, WarmsUp, prepare_task, rss_mb

log = logging.getLogger("medfusion.scoring")

Task = tuple[StudyRef, Mapping[str, Any] | None, bool]  # study, clinical record, explain
ScorerFactory = Callable[[str], Scorer]


def budget_failure(ref: StudyRef, what: str) -> dict[str, Any]:
    return {
        "study_id": ref.study_id,
        "key": ref.key,
        "ok": False,
        "recycle": True,
        "failure": {
            "study_id": ref.study_id,
            "stage": "load",
            "code": "BUDGET_EXCEEDED",
            "message": f"stopped: {what}; raise the budget or check the input",
        },
    }


class InlinePreparer:
    """Prepare in the calling process (``workers=0``): simplest, no overlap.

    The time budget is checked after the fact (nothing can interrupt the call safely)."""

    def __init__(
        self, scorer: Scorer, *, time_budget_s: float | None, memory_budget_mb: float | None
    ) -> None:
        self.scorer = scorer
        self.time_budget_s = time_budget_s
        self.memory_budget_mb = memory_budget_mb
        self._task: Task | None = None
        if memory_budget_mb is not None and isinstance(scorer, WarmsUp):
            scorer.warm_up()

    def capacity(self) -> int:
        return 0 if self._task else 1

    def busy(self) -> int:
        return 1 if self._task else 0

    def submit(self, task: Task) -> None:
        self._task = task

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        if self._task is None:
            return []
        ref, clinical, explain = self._task
        self._task = None
        start = time.monotonic()
        record = prepare_task(self.scorer, ref, clinical, explain=explain,
                              memory_budget_mb=self.memory_budget_mb)
        elapsed = time.monotonic() - start
        if record.get("ok") and self.time_budget_s and elapsed > self.time_budget_s:
            return [budget_failure(ref, f"took {elapsed:.1f} s, over the time budget")]
        return [record]

    def close(self) -> None:
        self._task = None


# --------------------------------------------------------------------------------------
# local worker processes


def _silence_process() -> None:
    """Point fds 1 and 2 at /dev/null: library warnings or a crash dump in a worker could
    quote header values (patient names); the parent reports every failure itself."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    logging.disable(logging.CRITICAL)


def worker_main(
    conn: Connection,
    factory: ScorerFactory,
    model_dir: str,
    memory_budget_mb: float | None,
    quiet: bool,
) -> None:
    """Body of one worker process: build the scorer once, then prepare tasks until told
    to stop (``None``)."""
    if quiet:
        _silence_process()
    import warnings

    warnings.simplefilter("ignore")
    try:
        import torch

        torch.set_num_threads(1)  # 2 processes x 1 thread beat 1 x 2 (design.md)
    except ImportError:  # pragma: no cover
        pass
    try:
        scorer = factory(model_dir)
    except MedfusionError as error:
        conn.send(("init_failed", error.code, error.message))
        return
    except Exception as error:  # noqa: BLE001 - reported, never printed
        conn.send(("init_failed", "MODEL_PACKAGE", f"worker could not load the model "
                   f"({type(error).__name__})"))
        return
    if memory_budget_mb is not None and isinstance(scorer, WarmsUp):
        scorer.warm_up()  # one-time allocations belong to the baseline, not the first study
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        ref, clinical, explain = task
        record = prepare_task(scorer, ref, clinical, explain=explain,
                              memory_budget_mb=memory_budget_mb)
        conn.send(("done", record))
        if record.get("recycle"):
            return  # memory is not given back reliably: a fresh process takes over


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    task: Task | None = None
    started: float = 0.0


class LocalPool:
    """N worker processes, each with at most one task in flight."""

    def __init__(
        self,
        n: int,
        model_dir: str,
        *,
        factory: ScorerFactory,
        time_budget_s: float | None = None,
        memory_budget_mb: float | None = None,
        start_method: str | None = None,
        quiet: bool = True,
    ) -> None:
        self.n = n
        self.model_dir = model_dir
        self.factory = factory
        self.time_budget_s = time_budget_s
        self.memory_budget_mb = memory_budget_mb
        self.quiet = quiet
        self.ctx = context(start_method)
        self.workers: list[_Worker] = []
        self.recycled = 0
        self._init_failures = 0
        self._queued: deque[Task] = deque()
        self._baseline_mb: dict[int, float] = {}
        # Processes are started from a thread: the first start waits for the fork server to
        # import torch and MONAI, and the caller meanwhile loads its own model copy.
        self._lock = threading.Lock()
        self._closed = False
        self._starter = threading.Thread(target=self._start_all, daemon=True)
        self._starter.start()

    def _start_all(self) -> None:
        for _ in range(self.n):
            worker = self._spawn()
            with self._lock:
                if self._closed:
                    worker.process.kill()
                    return
                self.workers.append(worker)

    def _live(self) -> list[_Worker]:
        with self._lock:
            return list(self.workers)

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=worker_main,
            args=(child, self.factory, self.model_dir, self.memory_budget_mb, self.quiet),
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker (whatever it is doing) and start a fresh one in its place."""
        try:
            worker.process.kill()
        except (OSError, AttributeError):  # already gone
            pass
        worker.process.join(timeout=5)
        worker.conn.close()
        self._baseline_mb.pop(id(worker), None)
        fresh = self._spawn()
        with self._lock:
            self.workers[self.workers.index(worker)] = fresh
        self.recycled += 1

    def capacity(self) -> int:
        # Workers not started yet count as idle: tasks wait in a short queue meanwhile, so
        # the first ones begin the moment a worker is ready.
        return max(0, self.n - self.busy())

    def busy(self) -> int:
        return sum(1 for w in self._live() if w.task is not None) + len(self._queued)

    def submit(self, task: Task) -> None:
        self._queued.append(task)
        self._dispatch()

    def _dispatch(self) -> None:
        for worker in self._live():
            if not self._queued:
                return
            if worker.ready and worker.task is None:
                task = self._queued.popleft()
                worker.conn.send(task)
                worker.task = task
                worker.started = time.monotonic()

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        watch: dict[Any, _Worker] = {}
        for worker in self._live():
            watch[worker.conn] = worker
            watch[worker.process.sentinel] = worker
        if not watch:  # still starting: wait instead of spinning
            time.sleep(timeout)
            return out
        ready = wait(list(watch), timeout=timeout)
        handled: set[int] = set()
        for obj in ready:
            worker = watch[obj]
            if id(worker) in handled:
                continue
            handled.add(id(worker))
            self._service(worker, out)
        self._check_budgets(out)
        self._dispatch()
        return out

    def _service(self, worker: _Worker, out: list[dict[str, Any]]) -> None:
        try:
            while worker.conn.poll():
                kind, *payload = worker.conn.recv()
                if kind == "ready":
                    worker.ready = True
                    self._init_failures = 0
                    rss = rss_mb(worker.process.pid)
                    if rss is not None:
                        self._baseline_mb[id(worker)] = rss
                elif kind == "init_failed":
                    raise ModelPackageError(str(payload[1]), code=str(payload[0]))
                elif kind == "done":
                    record = payload[0]
                    worker.task = None
                    out.append(record)
                    if record.get("recycle"):
                        self._replace(worker)
                        return
        except (EOFError, OSError):
            pass
        if not worker.process.is_alive():
            # Died: out of memory (killed by the OS), a crash in a native decoder...
            task = worker.task
            self._init_failures += 0 if worker.ready else 1
            if self._init_failures > 3:
                raise ModelPackageError(
                    "worker processes die while starting; check the model package and "
                    "available memory",
                    code="WORKER_START_FAILED",
                )
            self._replace(worker)
            if task is not None:
                record = budget_failure(task[0], "the worker process died")
                record["failure"]["code"] = "WORKER_CRASHED"
                record["failure"]["message"] = (
                    "the worker process died while loading this study (out of memory or a "
                    "crash in a decoder); check the input or raise the memory available"
                )
                out.append(record)

    def _check_budgets(self, out: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for worker in self._live():
            if worker.task is None:
                continue
            ref = worker.task[0]
            if self.time_budget_s and now - worker.started > self.time_budget_s:
                self._replace(worker)
                out.append(budget_failure(ref, f"over the {self.time_budget_s:g} s time budget"))
                continue
            base = self._baseline_mb.get(id(worker))
            if self.memory_budget_mb and base is not None:
                rss = rss_mb(worker.process.pid)
                if rss is not None and rss - base > self.memory_budget_mb:
                    self._replace(worker)
                    out.append(
                        budget_failure(ref, f"over the {self.memory_budget_mb:g} MiB memory budget")
                    )

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._starter.join()
        for worker in self.workers:
            try:
                if worker.process.is_alive() and worker.task is None:
                    worker.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self.workers = []
