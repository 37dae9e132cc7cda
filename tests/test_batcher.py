"""The server's micro-batcher: concurrent callers share passes, each gets its own answer or error."""

from __future__ import annotations

import threading
import time

import pytest

from hllm.serving.batcher import Batcher


def test_concurrent_jobs_share_passes_and_each_gets_its_own_answer():
    sizes = []

    def run(jobs: list[int]) -> list[int]:
        sizes.append(len(jobs))
        time.sleep(0.02)  # a model pass: callers arriving meanwhile wait for the next one
        return [job * 10 for job in jobs]

    batcher = Batcher(run, max_batch=8)
    answers = {}
    threads = [threading.Thread(target=lambda j=j: answers.update({j: batcher(j)})) for j in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert answers == {j: j * 10 for j in range(24)}
    assert sum(sizes) == 24 and max(sizes) > 1 and max(sizes) <= 8  # batched, never over the cap
    assert batcher.batches == len(sizes) and batcher.jobs == 24


def test_a_failing_pass_fails_its_callers_and_the_worker_goes_on():
    def run(jobs: list[int]) -> list[int]:
        if -1 in jobs:
            raise ValueError("bad job")
        return jobs

    batcher = Batcher(run)
    with pytest.raises(ValueError, match="bad job"):
        batcher(-1)
    assert batcher(5) == 5
