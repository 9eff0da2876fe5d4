"""``Pool.map``'s iterator (see ``_pool``): each item is a submitted call, and the
consumer's thread does all the work, with no thread of the map's own.

Items are drawn only when a child has a free place (fewer than ``max_concurrency``
calls in flight), so no item waits behind another in a child and a crash fails
only the items that were running in it; and at most ``_MAP_WINDOW`` items per
place are drawn ahead of the results handed out. In order, the consumer waits for
the oldest item's reply itself (the future's ``result()`` reads its pipe); as they
complete, it waits for the first future done, completed by each connection's
``submit`` thread.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._errors import ClientClosedError
from ._pool_children import Lease

if TYPE_CHECKING:
    from ._pool import Pool
    from ._pool_children import _Worker
    from ._pool_workers import Workers

R = TypeVar("R")

_NONE: Any = object()  # no item

#: How long an unordered map reads the oldest call's pipe before it waits for any.
_LOOK = 0.002

#: How far ``map`` draws ahead of the results handed out, in items per place in the pool.
_MAP_WINDOW = 2


class MapResults(Iterator[R]):
    """The iterator ``Pool.map`` returns (see there)."""

    def __init__(
        self, pool: Pool[Any], name: str, timeout: Any, source: Iterator[Any], ordered: bool
    ) -> None:
        self._pool = pool
        self._workers: Workers = pool._workers
        self._name = name
        self._timeout = timeout
        self._source: Iterator[Any] | None = source
        self._source_error: BaseException | None = None
        self._ordered = ordered
        self._places = pool._places
        self._window = pool.size * pool._places * _MAP_WINDOW
        self._flight: deque[Future[Any]] = deque()  # sent and not handed out, oldest first
        self._done: deque[Future[Any]] = deque()  # unordered: completed, not handed out
        self._held: Any = _NONE  # an item drawn when no child had a free place
        self._finished = False

    def __iter__(self) -> MapResults[R]:
        return self

    def __next__(self) -> R:
        if self._finished:
            raise StopIteration
        if self._workers.closed:  # every call would fail: not one per item left
            self.close()
            raise ClientClosedError("the pool was closed")
        self._send()
        flight = self._flight
        if not flight:
            self._finished = True
            error, self._source_error = self._source_error, None
            if error is not None:
                raise error
            raise StopIteration
        future = flight.popleft() if self._ordered else self._first_done()
        return cast(R, future.result())

    def _first_done(self) -> Future[Any]:
        done, flight = self._done, self._flight
        if not done:
            # Most often the oldest call's reply is the next to come: read its pipe in
            # this thread a moment (a future's wait), as an ordered map does, before
            # waiting for whichever completes first (each pipe read by its own thread).
            look = getattr(flight[0], "wait", None)
            if look is not None:
                look(time.monotonic() + _LOOK)
        if not done:
            concurrent.futures.wait(flight, return_when=concurrent.futures.FIRST_COMPLETED)
        future = done.popleft()
        flight.remove(future)
        return future

    def _send(self) -> None:
        """Draw and send items while the window has room and a child a free place; wait
        for a child only when nothing is in flight."""
        workers, flight = self._workers, self._flight
        while len(flight) < self._window:
            item = self._held
            if item is _NONE:
                item = self._draw()
                if item is _NONE:
                    return
            lease = Lease()
            try:  # taken inside the try: an interrupt anywhere after gives it back
                worker = workers.take_now(lease, self._places)
                timeout = self._timeout
                if worker is None:
                    if flight:
                        self._held = item
                        return
                    deadline = self._pool._deadline(timeout)
                    worker, waited = workers.take(lease, deadline, self._places)
                    if waited and deadline is not None:  # the wait counts against the call
                        timeout = max(deadline - time.monotonic(), 1e-6)
                self._held = _NONE
                flight.append(self._submit(worker, lease, item, timeout))
            except BaseException as exc:
                workers.give_back(lease, exc)
                raise

    def _draw(self) -> Any:
        """The next item, or ``_NONE`` once the source has ended (or failed: its error is
        raised after the items before it)."""
        source = self._source
        if source is None:
            return _NONE
        try:
            return next(source)
        except StopIteration:
            pass
        except Exception as exc:  # raised at the place of the item it failed to give
            self._source_error = exc
        self._source = None
        return _NONE

    def _submit(self, worker: _Worker, lease: Lease, item: Any, timeout: Any) -> Future[Any]:
        try:
            future = self._pool._submit_to(worker, lease, self._name, (item,), {}, timeout)
        except Exception as exc:  # the item's outcome: it never went
            self._workers.give_back(lease, exc)
            future = Future()
            future.set_exception(exc)
            return future
        if not self._ordered:
            future.add_done_callback(self._done.append)
        return future

    def close(self) -> None:
        """Stop drawing items; calls in flight finish in their children, their results
        dropped."""
        self._finished = True
        self._source = None
        self._held = _NONE
        self._flight.clear()
        self._done.clear()
