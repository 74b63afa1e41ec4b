"""gatewayd.worker.Worker: a one-thread executor for the event loop, on a real thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gatewayd.worker import Worker


async def test_jobs_run_in_submission_order_on_one_named_thread() -> None:
    w = Worker("test-worker")
    seen: list[tuple[int, str]] = []

    def job(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    try:
        results = await asyncio.gather(*(w.call(job, i) for i in range(50)))
    finally:
        w.close()
    assert results == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-worker"}
    assert threading.current_thread().name != "test-worker"


async def test_the_thread_starts_on_the_first_call_and_stops_at_close() -> None:
    w = Worker("lazy")
    assert not w.alive  # nothing started for a worker that is never used
    assert await w.call(lambda: 7) == 7
    assert w.alive
    w.close()
    assert not w.alive
    w.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        w.call(lambda: 1)


async def test_a_jobs_exception_reaches_the_caller_and_the_worker_goes_on() -> None:
    w = Worker("raises")

    def boom() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space left"):
            await w.call(boom)
        assert await w.call(lambda: "next") == "next"
    finally:
        w.close()


async def test_a_cancelled_caller_does_not_stop_a_queued_job() -> None:
    w = Worker("cancel")
    gate = threading.Event()
    ran = threading.Event()
    try:
        first = w.call(gate.wait, 5)
        second = w.call(ran.set)
        second.cancel()  # the caller stops waiting while the job is still queued
        gate.set()
        assert await first is True
        # the cancelled job still runs, in order, and its result is dropped without error
        assert await w.call(ran.is_set) is True
        assert second.cancelled()
    finally:
        w.close()


async def test_close_lets_queued_jobs_finish() -> None:
    w = Worker("drain")
    done: list[int] = []
    gate = threading.Event()
    w.call(gate.wait, 5)
    futs = [w.call(done.append, i) for i in range(5)]
    gate.set()
    w.close()  # joins after the queued jobs
    assert done == [0, 1, 2, 3, 4]
    await asyncio.gather(*futs)  # their results were delivered to the loop


async def test_close_without_wait_does_not_block_on_a_stuck_job() -> None:
    w = Worker("stuck")
    gate = threading.Event()
    fut = w.call(gate.wait, 10)
    w.close(wait=False)  # returns while the job still blocks (a hung disk)
    assert w.alive
    gate.set()
    assert await fut is True
