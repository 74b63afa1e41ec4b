"""A thread that runs blocking calls for the event loop, one at a time, in order.

`loop.run_in_executor` costs about 130 µs of CPU per call on a slow 2-core machine (measured:
a concurrent.futures.Future with its Condition, a chained asyncio future, the state copied
between them, two callbacks). A queue commit, a lease from disk and a cursor write each make
one such call, several times a second even when idle, so the hand-off itself was a visible
share of the daemon's idle CPU. This worker hands the job to its thread through a
`queue.SimpleQueue` and delivers the result straight to an asyncio future with one
`call_soon_threadsafe`: about 50 µs per call.

Semantics, as a one-thread executor:
- jobs run in submission order, one at a time, on the worker's own thread;
- a job's exception (any BaseException) is raised to the awaiting caller;
- a job already queued runs even if its caller stopped waiting (its result is then dropped).
  Callers that need a job to finish regardless (a commit) shield it as before.
- `close()` lets queued jobs finish, then stops the thread (and joins it, unless
  `wait=False`: a job stuck on a hung disk must not block the event loop). Calls after
  `close()` raise RuntimeError.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


class Worker:
    """One named thread running blocking calls for asyncio (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)` on the worker's thread; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"worker {self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put((loop, fut, fn, args))
        return fut

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            loop, fut, fn, args = job
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # raised in the caller, as an executor does
                result, exc = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more
            del job, fut, result, exc  # drop references before blocking on the next job

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread; with `wait`, block until it has."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._jobs.put(_STOP)
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
