"""Micro-batching for the server: requests that arrive while the model is busy share its next pass.

On a small CPU one User LLM pass over 8 histories costs little more than over one, so concurrent
requests queueing for the cores one by one waste most of it. A single worker thread takes
everything waiting, runs it as one batch and hands each caller its row. Nothing waits for a timer:
at low load a request runs alone at once, under load batches grow by themselves.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class Batcher(Generic[Job, Result]):
    """`batcher(job)` blocks until `run([job, ...])` has answered it, batched with whatever else waits;
    `batcher.submit(job)` returns its future instead (an async caller awaits it without a thread)."""

    def __init__(self, run: Callable[[list[Job]], list[Result]], *, max_batch: int = 64) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Job, Future]] = queue.SimpleQueue()
        self.batches = 0  # passes run so far (for /metrics)
        self.jobs = 0
        threading.Thread(target=self._serve, name="hllm-batcher", daemon=True).start()

    def __call__(self, job: Job) -> Result:
        return self.submit(job).result()

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self._queue.put((job, future))
        return future

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.batches, self.jobs = self.batches + 1, self.jobs + len(batch)
            try:
                answered = list(zip(batch, self._run([job for job, _ in batch]), strict=True))
            except Exception as err:  # every caller of the failed batch gets the error, the worker lives on
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), result in answered:
                future.set_result(result)
