"""The batching scheduler: one worker thread owns the bank and runs every edit; requests wait in a bounded queue.

Batching rule: the worker takes the oldest waiting request and waits until `max_batch` requests that can share a
pipeline call are waiting, or until that oldest request has waited `batch_wait_ms`, whichever comes first. Requests
share a call when their image size and options (steps, guidance, image guidance) match; adapters and seeds may differ
(`AdapterBank.edit_batch` mixes them). Requests that do not match wait for a later batch, in arrival order.

A request whose client went away, or whose deadline passed, before the worker reached it is dropped there (no
work is done for it). One already in a running batch finishes with the batch, its result discarded, unless every
request of that batch was abandoned: then the batch stops at the next denoising step and the worker moves on (a
batch of minutes on a CPU no longer holds the worker for nobody).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..adapters.bank import AUTO
from ..adapters.batch_edit import Stopped
from ..errors import AdapterkitError
from .inputs import ServeError, unknown_adapter

log = logging.getLogger("adapterkit.serve")


class QueueFull(Exception):
    """The queue holds `queue` requests already; `retry_after` (seconds) estimates when one will have left."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy ({depth} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Outcome:
    image: object  # PIL image, the edited result
    task: str | None  # the adapter that edited it (None: the base alone)
    score: float | None  # routing cosine when the request asked for "auto", else None
    batch_size: int  # how many requests shared its pipeline call
    queue_s: float  # seconds from submission to the start of its batch
    compute_s: float  # seconds of its batch's pipeline call


@dataclass(eq=False)
class Job:
    image: object  # PIL RGB image at the size it is edited at (already resized)
    instruction: str
    task: str | None  # a task name, None (the base) or AUTO (route in the worker)
    seed: int
    options: dict  # steps, guidance, image_guidance: equal within a batch
    deadline: float  # time.monotonic() after which the work is not started
    submitted: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    drop_reason: str | None = None
    score: float | None = None  # routing cosine, set in the worker when task was AUTO

    @property
    def key(self) -> tuple:
        return (self.image.size, tuple(sorted(self.options.items())))

    def drop(self, reason: str) -> bool:
        """Cancel the job if the worker has not started it; True when no work will be done for it. A started job
        keeps running, marked abandoned (`drop_reason`), until its whole batch is (Scheduler._execute)."""
        self.drop_reason = reason
        return self.future.cancel()


class Scheduler:
    def __init__(self, catalog, settings, metrics):
        self.catalog = catalog  # .bank: the AdapterBank the worker uses (replaced when adapters are removed)
        self.settings = settings
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held while a batch runs; catalog changes take it too (`exclusive`)
        self._stopping = False
        self._recent_batch_s = 1.0  # duration of the last batch, for Retry-After
        self._worker = threading.Thread(target=self._run, name="adapterkit-serve-worker", daemon=True)

    # --------------------------------------------------------------------------------------------- clients
    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.drop("shutdown")
            self._pending.clear()
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._pending) >= self.settings.queue:
                batches_ahead = -(-len(self._pending) // self.settings.max_batch)
                raise QueueFull(len(self._pending), max(1, round(batches_ahead * self._recent_batch_s)))
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()
        return job

    @contextlib.contextmanager
    def exclusive(self):
        """No batch runs inside this block (for adding or removing adapters)."""
        with self._busy:
            yield

    # ---------------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._busy:
                try:
                    self._execute(batch)
                except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch (a metrics bug, say)
                    log.exception("batch failed")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready; None when stopping."""
        wait_s = self.settings.batch_wait_ms / 1000.0
        with self._cond:
            while True:
                self._drop_dead()
                if self._stopping:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                matching = [j for j in self._pending if j.key == first.key][: self.settings.max_batch]
                remaining = first.submitted + wait_s - time.monotonic()
                if len(matching) < self.settings.max_batch and remaining > 0:
                    self._cond.wait(remaining)
                    continue
                for job in matching:
                    self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                # A client may cancel between the check above and here; those jobs are counted and left out.
                batch = [j for j in matching if j.future.set_running_or_notify_cancel()]
                for job in matching:
                    if job.future.cancelled():
                        self.metrics.dropped.labels(reason=job.drop_reason or "cancelled").inc()
                if batch:
                    return batch

    def _drop_dead(self) -> None:
        """Remove cancelled jobs and jobs past their deadline, counting why each was dropped."""
        now = time.monotonic()
        keep = deque()
        for job in self._pending:
            if not job.future.cancelled() and now > job.deadline:
                job.drop("timeout")
            if job.future.cancelled():
                self.metrics.dropped.labels(reason=job.drop_reason or "cancelled").inc()
            else:
                keep.append(job)
        self._pending = keep

    def _execute(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        bank = self.catalog.bank
        try:
            self._resolve_tasks(bank, jobs)
            images = bank.edit_batch([j.image for j in jobs], [j.instruction for j in jobs], tasks=[j.task for j in jobs],
                                     seeds=[j.seed for j in jobs], stop=lambda: all(j.drop_reason for j in jobs),
                                     **jobs[0].options)
        except Stopped as e:  # nobody waits for any of these results any more
            for job in jobs:
                self.metrics.stopped.labels(reason=job.drop_reason).inc()
                job.future.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: retry them one by one
            if len(jobs) > 1 and isinstance(e, (AdapterkitError, ServeError, ValueError)):
                for job in jobs:
                    self._execute([job])
                return
            for job in jobs:
                job.future.set_exception(e)
            return
        compute_s = time.monotonic() - started
        self._recent_batch_s = compute_s
        self.metrics.observe_batch(jobs, started, compute_s)
        for job, image in zip(jobs, images):
            job.future.set_result(Outcome(image, job.task, job.score, len(jobs), started - job.submitted, compute_s))

    @staticmethod
    def _resolve_tasks(bank, jobs: list[Job]) -> None:
        """Route the jobs that asked for AUTO (their task becomes the routed one); check the others still exist."""
        for job in jobs:
            if job.task == AUTO:
                job.task, job.score = bank.route(job.instruction)
            elif job.task is not None and job.task not in bank:  # removed while the request waited
                raise unknown_adapter(job.task, bank.tasks)
