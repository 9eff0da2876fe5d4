"""``Pool.map``'s iterator and threads (see ``_pool``)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._errors import ClientClosedError

if TYPE_CHECKING:
    import queue

    from ._pool import Pool

R = TypeVar("R")

#: How far ``map`` runs ahead of the results handed out, in calls per place in the pool.
_MAP_WINDOW = 2


class _MapRun:
    """What ``map``'s threads share with its iterator: the queues and the stop flag."""

    def __init__(self, tasks: queue.SimpleQueue[Any], results: queue.SimpleQueue[Any]) -> None:
        self.tasks = tasks
        self.results = results
        self.stopped = False
        self.threads: list[threading.Thread] = []


def _map_thread(
    call: Callable[[str, tuple[Any, ...], dict[str, Any], Any, int], Any],
    run: _MapRun,
    name: str,
    timeout: Any,
    places: int,
) -> None:
    """One of ``map``'s threads: make the calls it is given, one at a time."""
    tasks, results = run.tasks, run.results
    while True:
        task = tasks.get()
        if task is None or run.stopped:
            return
        index, item = task
        try:
            value = call(name, (item,), {}, timeout, places)
        except BaseException as exc:  # the item's outcome
            results.put((index, False, exc))
        else:
            results.put((index, True, value))


class MapResults(Iterator[R]):
    """The iterator ``Pool.map`` returns (see there)."""

    def __init__(
        self, pool: Pool[Any], name: str, timeout: Any, source: Iterator[Any], ordered: bool
    ) -> None:
        self._pool = pool
        self._name = name
        self._timeout = timeout
        self._source: Iterator[Any] | None = source
        self._source_error: BaseException | None = None
        self._ordered = ordered
        places = pool.size * pool._places
        self._threads = places
        self._window = places * _MAP_WINDOW
        self._sent = 0  # items drawn and sent
        self._pending = 0  # sent, result not received
        self._next = 0  # ordered: the index of the next result to hand out
        self._buffer: dict[int, tuple[bool, Any]] = {}
        self._run: _MapRun | None = None
        self._stopper: weakref.finalize[Any, Any] | None = None
        self._finished = False

    def __iter__(self) -> MapResults[R]:
        return self

    def __next__(self) -> R:
        if self._finished:
            raise StopIteration
        if self._pool._workers.closed:  # every call would fail: not one per item left
            self.close()
            raise ClientClosedError("the pool was closed")
        run = self._run or self._start()
        while True:
            self._send(run)
            outcome = self._take_ready()
            if outcome is not None:
                ok, value = outcome
                if ok:
                    return cast(R, value)
                raise value
            if not self._pending:
                self._finish()
                error, self._source_error = self._source_error, None
                if error is not None:
                    raise error
                raise StopIteration
            index, ok, value = run.results.get()
            self._pending -= 1
            self._buffer[index] = (ok, value)

    def _start(self) -> _MapRun:
        import queue

        run = _MapRun(queue.SimpleQueue(), queue.SimpleQueue())
        self._run = run
        pool = self._pool
        for number in range(self._threads):
            thread = threading.Thread(
                target=_map_thread,
                args=(pool._call, run, self._name, self._timeout, pool._places),
                name=f"pipe_rpc-map-{number}",
                daemon=True,
            )
            thread.start()
            run.threads.append(thread)
        self._stopper = weakref.finalize(self, _stop, run, self._threads)
        return run

    def _send(self, run: _MapRun) -> None:
        """Draw and send items while the window has room."""
        source = self._source
        while source is not None and self._pending + len(self._buffer) < self._window:
            try:
                item = next(source)
            except StopIteration:
                source = self._source = None
            except Exception as exc:  # raised at the place of the item it failed to give
                self._source_error = exc
                source = self._source = None
            else:
                run.tasks.put((self._sent, item))
                self._sent += 1
                self._pending += 1

    def _take_ready(self) -> tuple[bool, Any] | None:
        buffer = self._buffer
        if self._ordered:
            outcome = buffer.pop(self._next, None)
            if outcome is not None:
                self._next += 1
            return outcome
        if buffer:
            return buffer.pop(next(iter(buffer)))
        return None

    def _finish(self) -> None:
        """Every item is handed out: the threads end, and are waited for (they are idle)."""
        self._finished = True
        run = self._run
        if run is not None and self._stopper is not None:
            self._stopper()
            for thread in run.threads:
                thread.join(1.0)

    def close(self) -> None:
        """Stop sending items; calls in flight finish in their children, their results dropped."""
        if self._finished:
            return
        self._finished = True
        self._source = None
        self._buffer.clear()
        if self._stopper is not None:
            self._stopper()


def _stop(run: _MapRun, threads: int) -> None:
    """Drop the items not sent yet and let each thread end after its call."""
    run.stopped = True
    with contextlib.suppress(Exception):
        while True:
            run.tasks.get_nowait()
    for _ in range(threads):
        run.tasks.put(None)
