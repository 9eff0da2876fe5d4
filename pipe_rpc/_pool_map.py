"""``Pool.map``'s iterator (see ``_pool``): items sent as calls, one or a chunk at a time,
and the consumer's thread does all the work, with no thread of the map's own.

Items are drawn only when a child has a free place (fewer than ``max_concurrency``
calls in flight), so no item waits behind another call in a child, and at most a
window of items per place is drawn ahead of the results handed out. In order, the
consumer waits for the oldest call's reply itself (the future's ``result()`` reads
its pipe; for a chunk, half a millisecond at a time, sending the next chunks to the
children that answered meanwhile); as they complete, it waits for the first future
done, completed by each connection's ``submit`` thread.

Chunks (``_chunks``). A call costs the parent far more than a tiny item costs the
child, so with ``chunksize`` many quick items go to one call. With ``"auto"``, the
first items go one per chunk; each chunk's answer tells how long its items took
the child, and the next is sized to about ``_CHUNK_WORK`` of it (at most
``_MAX_CHUNK`` items, growing at most eightfold at a time), and no more items are
drawn ahead than four times those answered. Items slower than that keep going one by
one. Without chunks (the default, or a timeout, untrusted children, recycling by
calls, a method that is not plain) each item is an ordinary submitted call.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._chunks import MAP, Outcomes, item_error, open_chunk
from ._errors import ClientClosedError
from ._messages import Kind
from ._pool_children import Lease
from ._proxy import DEFAULT

if TYPE_CHECKING:
    from ._pool import Pool
    from ._pool_children import _Worker
    from ._pool_workers import Workers

R = TypeVar("R")

#: How long an unordered map reads the oldest call's pipe before it waits for any.
_LOOK = 0.002

#: How long an ordered map waits for the oldest chunk before it sends the next ones.
_REFILL = 0.0005

#: How far ``map`` draws ahead of the results handed out, in calls per place in the pool.
_MAP_WINDOW = 2

#: How much of a child's time one chunk is sized to take, in nanoseconds.
_CHUNK_WORK = 1_000_000
#: The most items in one chunk.
_MAX_CHUNK = 4096

#: Iterators that cannot raise: drawn from without ``_guarded``'s generator.
_SAFE_ITERATORS: set[type] = {
    type(iter(range(0))),
    type(iter(range(1 << 64))),
    type(iter([])),
    type(iter(())),
    type(iter("")),
    type(iter(b"")),
}


class _Sent:
    """One call of the map: a single item (``count == 0``) or a chunk of ``count``."""

    __slots__ = ("count", "future", "outcomes")

    def __init__(self, future: Future[Any], count: int) -> None:
        self.future = future
        self.count = count
        self.outcomes: Outcomes | None = None

    def open(self, future: Future[Any] | None = None) -> Outcomes:
        """The chunk's outcomes (its call's failure raised: every item's), from its
        future or from ``future``, which is the same (a done callback's argument)."""
        outcomes = self.outcomes
        if outcomes is None:
            done = self.future if future is None else future
            outcomes = self.outcomes = open_chunk(done.result(), self.count)
        return outcomes


class _Failed:
    """An item of a chunk that raised, in its place among the results."""

    __slots__ = ("failure", "index", "sent")

    def __init__(self, sent: _Sent, index: int, failure: BaseException | None) -> None:
        self.sent = sent
        self.index = index
        self.failure = failure  # the whole chunk's, if it failed

    def raise_it(self) -> None:
        if self.failure is not None:  # raised for every item: without the last one's frames
            raise self.failure.with_traceback(None)
        raise item_error(self.sent.open(), self.index)


class MapResults(Iterator[R]):
    """The iterator ``Pool.map`` returns (see there)."""

    def __init__(
        self,
        pool: Pool[Any],
        name: str,
        timeout: Any,
        source: Iterator[Any],
        ordered: bool,
        chunksize: int | Literal["auto"] = 1,
    ) -> None:
        self._pool = pool
        self._workers: Workers = pool._workers
        self._name = name
        self._timeout = timeout
        if type(source) not in _SAFE_ITERATORS:
            source = self._guarded(source)
        self._source: Iterator[Any] | None = source
        self._source_error: BaseException | None = None
        self._ordered = ordered
        self._places = pool._places
        self._calls = pool.size * pool._places * _MAP_WINDOW  # the most calls drawn ahead
        self._flight: deque[_Sent] = deque()  # sent and not handed out, oldest first
        self._done: deque[_Sent] = deque()  # unordered: completed, not handed out
        self._ready: deque[Any] = deque()  # the results of an answered chunk, in order
        self._pop = self._ready.popleft
        self._rest: deque[Any] = deque()  # those of one with failed items (see ``_Failed``)
        self._finished = False
        self._drawn = self._answered = 0  # items drawn, and items of chunks answered
        self._fixed = None if chunksize == "auto" else chunksize
        #: Items per call: 0 for single calls, decided before the first is sent.
        self._chunk: int | None = 0 if chunksize == 1 else None

    def __iter__(self) -> MapResults[R]:
        return self

    def __next__(self) -> R:
        try:
            return self._pop()  # type: ignore[no-any-return]  # the rest of an answered chunk
        except IndexError:
            return self._next_call()

    def _next_call(self) -> R:
        rest = self._rest
        if rest:  # a chunk with failed items: each raises in its place
            value = rest.popleft()
            if type(value) is _Failed:
                value.raise_it()
            return value  # type: ignore[no-any-return]
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
        sent = self._oldest() if self._ordered else self._first_done()
        if not sent.count:
            return sent.future.result()  # type: ignore[no-any-return]
        self._answered += sent.count
        try:
            results, errors, _ = sent.open()
        except Exception as exc:  # the chunk failed (its child died): every item raises it
            rest.extend(_Failed(sent, index, exc) for index in range(sent.count))
        else:
            if errors:
                for index in errors:
                    results[index] = _Failed(sent, index, None)
                rest.extend(results)
            else:
                self._ready.extend(results)
        self._send()  # its child has a free place again: keep it busy meanwhile
        return self.__next__()

    def _oldest(self) -> _Sent:
        """The oldest call, once answered. A chunk is waited for a little at a time, and
        the children that answered meanwhile are given their next chunks: in order, the
        oldest may not be the first to come."""
        flight = self._flight
        sent = flight[0]
        if sent.count:
            future = sent.future
            wait = getattr(future, "wait", None)
            while wait is not None and not future.done():
                wait(time.monotonic() + _REFILL)
                self._send()
        return flight.popleft()

    def _first_done(self) -> _Sent:
        done, flight = self._done, self._flight
        if not done:
            # Most often the oldest call's reply is the next to come: read its pipe in
            # this thread a moment (a future's wait), as an ordered map does, before
            # waiting for whichever completes first (each pipe read by its own thread).
            look = getattr(flight[0].future, "wait", None)
            if look is not None:
                look(time.monotonic() + _LOOK)
        if not done:
            concurrent.futures.wait(
                [sent.future for sent in flight], return_when=concurrent.futures.FIRST_COMPLETED
            )
        sent = done.popleft()
        flight.remove(sent)
        return sent

    def _send(self) -> None:
        """Draw and send items while the window has room and a child a free place; wait
        for a child only when nothing is in flight."""
        workers, flight = self._workers, self._flight
        while self._source is not None and len(flight) < self._calls:
            lease = Lease()
            try:  # taken inside the try: an interrupt anywhere after gives it back
                # Quick items: a second chunk waits in each child, so it never idles.
                places = self._places + ((self._chunk or 0) > 1)
                worker = workers.take_now(lease, places)
                timeout = self._timeout
                if worker is None:
                    if flight:
                        return
                    deadline = self._pool._deadline(timeout)
                    worker, waited = workers.take(lease, deadline, self._places)
                    if waited and deadline is not None:  # the wait counts against the call
                        timeout = max(deadline - time.monotonic(), 1e-6)
                chunk = self._chunk
                if chunk is None:
                    chunk = self._chunk = self._first_chunk(worker)
                items = self._draw(self._room(chunk))
                if not items:  # the source has ended, or enough is drawn ahead
                    workers.give_back(lease)
                    return
                flight.append(self._submit(worker, lease, items, timeout, chunk))
            except BaseException as exc:
                workers.give_back(lease, exc)
                raise

    def _room(self, chunk: int) -> int:
        """How many items the next call may take: ``chunk``, and no more items ahead of
        those answered than four times as many (so that a map of which few results are
        taken draws few items, however large its chunks would grow)."""
        if not chunk:
            return 1
        answered = self._answered
        ahead = self._drawn - answered
        return max(min(chunk, max(4 * answered, self._calls) - ahead), 0)

    def _first_chunk(self, worker: _Worker) -> int:
        """Items per call: 0 (single calls) unless chunks may go, then ``chunksize``, or
        1 to begin with for ``"auto"``."""
        pool = self._pool
        seconds = pool._timeout if self._timeout is DEFAULT else self._timeout
        if not pool._chunks or seconds is not None:
            return 0
        if worker.server.kind(self._name) is not Kind.METHOD:
            return 0
        return self._fixed or 1

    def _draw(self, count: int) -> list[Any]:
        """Up to ``count`` items; fewer once the source has ended (or failed: its error
        is raised after the items before it, see ``_guarded``)."""
        source = self._source
        if source is None or not count:
            return []
        items = list(islice(source, count))
        if len(items) < count:
            self._source = None
        self._drawn += len(items)
        return items

    def _guarded(self, source: Iterator[Any]) -> Iterator[Any]:
        """``source``, ended by its error, which is kept to be raised in its place."""
        try:
            yield from source
        except Exception as exc:
            self._source_error = exc

    def _submit(
        self, worker: _Worker, lease: Lease, items: list[Any], timeout: Any, chunk: int
    ) -> _Sent:
        args: tuple[Any, ...]
        if chunk:
            method, args = MAP, (self._name, items)
        else:
            method, args = self._name, (items[0],)
        sent = _Sent(Future(), len(items) if chunk else 0)
        # Counted into the worker's counts before the lease goes back (and it may close).
        first = functools.partial(self._chunk_done, sent, worker) if chunk else None
        try:
            future = self._pool._submit_to(worker, lease, method, args, {}, timeout, first)
        except Exception as exc:  # the item's outcome: it never went
            self._workers.give_back(lease, exc)
            sent.future.set_exception(exc)
            return sent
        sent.future = future
        if not self._ordered:
            future.add_done_callback(lambda _: self._done.append(sent))
        return sent

    def _chunk_done(self, sent: _Sent, worker: _Worker, future: Future[Any]) -> None:
        """A chunk's answer came: count its items as calls of the method, and size the
        next chunk from how long they took."""
        counts = worker.server._counters.of(self._name)
        try:  # ``future``, not ``sent.future``: this may run before ``_submit`` sets it
            _, errors, elapsed = sent.open(future)
        except BaseException:
            counts.add(sent.count, sent.count, 0)
            return
        counts.add(sent.count, len(errors), elapsed // sent.count)
        if self._fixed is None and elapsed:
            per_item = max(elapsed // sent.count, 1)
            size = min(_CHUNK_WORK // per_item, _MAX_CHUNK, (self._chunk or 1) * 8)
            self._chunk = max(size, 1)

    def close(self) -> None:
        """Stop drawing items; calls in flight finish in their children, their results
        dropped."""
        self._finished = True
        self._source = None
        self._flight.clear()
        self._done.clear()
        self._ready.clear()
        self._rest.clear()
