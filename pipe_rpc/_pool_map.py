"""``Pool.map``'s iterator (see ``_pool``): items sent as calls, one or a chunk at a time,
and the consumer's thread does all the work, with no thread of the map's own.

Items are drawn only when a child has a free place (fewer than ``max_concurrency``
calls in flight), so no item waits behind another call in a child, and at most a
window of items per place is drawn ahead of the results handed out. In order, the
consumer waits for the oldest call's reply itself (the future's ``result()`` reads
its pipe; for a chunk, half a millisecond at a time, sending the next chunks to the
children that answered meanwhile); as they complete, it waits for the first future
done, completed by each connection's ``submit`` thread.

Handing out (``MapResults``). The results are an ``itertools.chain`` over each
call's results, so ``next()`` and a ``for`` loop take each one in C; Python runs
once per call, between them (``Map``'s steps). Interrupts: the items drawn wait
in ``_unsent`` until their call is in ``_flight``, a call leaves ``_flight`` only
after its results are queued for the chain (by the next step), and an item's
error is raised with no landing point between taking it and raising it. So an
interrupt anywhere loses no item and hands none out twice; one landing while a call
is being sent ends that call, whose items raise it in their place.

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
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, cast

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
_MAX_CHUNK = 16384

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

    __slots__ = ("answered", "count", "future", "outcomes")

    def __init__(self, future: Future[Any], count: int) -> None:
        self.future = future
        self.count = count
        self.outcomes: Outcomes | None = None
        self.answered = False  # counted in the map's items answered

    def open(self, future: Future[Any] | None = None) -> Outcomes:
        """The chunk's outcomes (its call's failure raised: every item's), from its
        future or from ``future``, which is the same (a done callback's argument)."""
        outcomes = self.outcomes
        if outcomes is None:
            done = self.future if future is None else future
            outcomes = self.outcomes = open_chunk(done.result(), self.count)
        return outcomes


#: A step's "no item": the chain goes on to the iterators the step queued.
_END = object()

#: What a step queues: runs of results, and items' errors between them.
_Part: TypeAlias = "list[Any] | _Raiser"


class _Raiser:
    """An item's error, raised in its place by the chain (through a C iterator, so that
    the chain survives it). An interrupt landing as ``__next__`` starts leaves it to be
    raised by the next ``next()``; from taking it to raising it there is no landing
    point."""

    __slots__ = ("error", "shared")

    def __init__(self, error: BaseException | None, shared: bool = False) -> None:
        self.error = error
        self.shared = shared  # raised for each item of a chunk: without the last's frames

    def __next__(self) -> object:
        error = self.error
        if error is None:
            return _END
        if self.shared:
            error = error.with_traceback(None)
        self.error = None
        raise error


def _its_outcome(future: Future[Any], error: BaseException) -> bool:
    """Was ``error``, raised from taking ``future``'s outcome, that outcome (the call's
    error, or its answer found malformed), not an interrupt that landed meanwhile?"""
    if isinstance(error, Exception):
        return True
    return future.done() and not future.cancelled() and future.exception() is error


class MapResults(chain[R]):
    """The iterator ``Pool.map`` returns (see there): an ``itertools.chain`` over the
    batches its ``Map`` queues, so that ``next()`` and a ``for`` loop take each
    result in C. Made by ``map_results``."""

    _map: Map

    def close(self) -> None:
        """Stop drawing items; calls in flight finish in their children, their results
        dropped."""
        self._map.close()


def map_results(state: Map) -> MapResults[Any]:
    """``Pool.map``'s results: a ``MapResults`` chained over ``state``'s queue."""
    results = cast(MapResults[Any], MapResults.from_iterable(iter(state.queue.popleft, None)))
    results._map = state  # the chain holds the map only through its steps
    return results


class Map:
    """A map's state and its steps.

    The results are handed out by one ``itertools.chain`` (``MapResults``) over the
    batches queued in ``queue`` (a chunk's results, a single call's result). After
    each batch comes a step (``_step``, called through a C iterator) that waits for
    the next call and queues its batch and another step. A step that raises (an
    item's error, an interrupt) stays in the chain and is called again by the next
    ``next()``; the chain is never left holding an item."""

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
        self._unsent: list[Any] = []  # items drawn and not sent yet
        self._finished = False
        self._drawn = self._answered = 0  # items drawn, and items of chunks answered
        self._fixed = None if chunksize == "auto" else chunksize
        #: Items per call: 0 for single calls, decided before the first is sent.
        self._chunk: int | None = 0 if chunksize == 1 else None
        #: The chain's next iterators: a batch, then a step; ``None`` ends the chain.
        self.queue: deque[Iterator[Any] | None] = deque([iter(self._step, _END)])
        self._batch: list[_Part] = []  # the parts last queued, emptied by ``close()``

    def _step(self, prev: object = None) -> Any:
        """Wait for the next call's answer and queue its results (the chain's next
        iterator) with the step after them; ``_END`` hands the chain on to them.

        ``prev`` is the call (or the source's error) the step before queued, which only
        now leaves the calls in flight: an interrupt anywhere in between can neither
        drop a batch nor queue it twice. A step an interrupt ended runs again."""
        queue = self.queue
        if prev is not None:
            self._hand(prev)
        if queue:  # queued before an interrupt ended this step: go on to it
            return _END
        if self._finished:
            error = self._source_error
            if error is None:
                queue.append(None)
            else:  # after the items before it
                self._queue_batch([_Raiser(error)], error)
            return _END
        if self._workers.closed:  # every call would fail: not one per item left
            self.close()
            raise ClientClosedError("the pool was closed")
        self._send()
        if not self._flight:
            self._finished = True
            return self._step()
        sent = self._oldest() if self._ordered else self._first_done()
        if sent.count:
            self._queue_chunk(sent)
            self._send()  # its child has a free place again: keep it busy meanwhile
        else:
            self._queue_single(sent)
        return _END

    def _queue_single(self, sent: _Sent) -> None:
        """A single call's result, or its error, raised in its place."""
        future = sent.future
        try:
            value = future.result()
        except BaseException as exc:
            if not _its_outcome(future, exc):
                raise  # an interrupt: this step runs again
            self._queue_batch([_Raiser(exc)], sent)
        else:
            self._queue_batch([[value]], sent)

    def _queue_chunk(self, sent: _Sent) -> None:
        """A chunk's results, each failed item's error raised in its place: runs of
        results as list iterators, each error between them as its own iterator."""
        try:
            results, errors, _ = sent.open()
        except BaseException as exc:  # the chunk failed (its child died): every item raises it
            if not _its_outcome(sent.future, exc):
                raise  # an interrupt: this step runs again
            self._queue_batch([_Raiser(exc, shared=True) for _ in range(sent.count)], sent)
        else:
            parts: list[_Part] = []
            start = 0
            for index in sorted(errors):
                if start < index:
                    parts.append(results[start:index])
                parts.append(_Raiser(item_error((results, errors, 0), index)))
                start = index + 1
            parts.append(results[start:] if start else results)
            self._queue_batch(parts, sent)
        self._count_answered(sent)

    def _count_answered(self, sent: _Sent) -> None:
        """Count ``sent``'s items as answered, once (no landing point in between)."""
        if not sent.answered:
            sent.answered = True
            self._answered += sent.count

    def _queue_batch(self, parts: list[_Part], of: object) -> None:
        """Queue ``parts`` (as C iterators) and, after them, the step that hands ``of``
        out."""
        self._batch = parts
        iterators = [
            iter(part) if isinstance(part, list) else iter(part.__next__, _END) for part in parts
        ]
        self.queue.extend([*iterators, iter(functools.partial(self._step, of), _END)])

    def _hand(self, prev: object) -> None:
        """``prev``'s batch is queued: it leaves the calls in flight (or the error is
        forgotten)."""
        if type(prev) is _Sent:
            self._count_answered(prev)  # if an interrupt kept its step from it
            flight = self._flight
            if prev in flight:
                flight.remove(prev)
        elif prev is self._source_error:
            self._source_error = None

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
        return sent

    def _first_done(self) -> _Sent:
        """The first call in flight found answered."""
        flight = self._flight
        for sent in flight:
            if sent.future.done():
                return sent
        # Most often the oldest call's reply is the next to come: read its pipe in this
        # thread a moment (a future's wait), as an ordered map does, before waiting for
        # whichever completes first (each pipe read by its own thread).
        look = getattr(flight[0].future, "wait", None)
        if look is not None:
            look(time.monotonic() + _LOOK)
        futures = [sent.future for sent in flight]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        return next(sent for sent in flight if sent.future.done())

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
                self._submit(worker, lease, items, timeout, chunk)
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
        ahead = self._drawn - answered - len(self._unsent)  # sent, not answered
        room = max(min(chunk, max(4 * answered, self._calls) - ahead), 0)
        return room if room or self._flight else 1  # never none with nothing in flight

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
        is raised after the items before it, see ``_guarded``). They stay in ``_unsent``
        until ``_submit`` takes them, so an interrupt loses none."""
        unsent, source = self._unsent, self._source
        missing = count - len(unsent)
        if missing > 0 and source is not None:
            before = len(unsent)
            unsent.extend(islice(source, missing))  # in C: each item kept as it is drawn
            if len(unsent) < count:
                self._source = None
            self._drawn += len(unsent) - before
        return unsent[:count]

    def _guarded(self, source: Iterator[Any]) -> Iterator[Any]:
        """``source``, ended by its error, which is kept to be raised in its place."""
        try:
            yield from source
        except Exception as exc:
            self._source_error = exc

    def _submit(
        self, worker: _Worker, lease: Lease, items: list[Any], timeout: Any, chunk: int
    ) -> None:
        """Send ``items`` (taken from ``_unsent``) as one call, in flight from before it
        goes: if sending fails, or an interrupt ends it, the items raise its error in
        their place."""
        args: tuple[Any, ...]
        if chunk:
            method, args = MAP, (self._name, items)
        else:
            method, args = self._name, (items[0],)
        sent = _Sent(Future(), len(items) if chunk else 0)
        # Counted into the worker's counts before the lease goes back (and it may close).
        first = functools.partial(self._chunk_done, sent, worker) if chunk else None
        del self._unsent[: len(items)]  # no landing point between this and the append
        try:  # an interrupt can land as the append returns: in the try
            self._flight.append(sent)
            sent.future = self._pool._submit_to(worker, lease, method, args, {}, timeout, first)
        except BaseException as exc:  # the call's outcome: it never went, or was abandoned
            self._workers.give_back(lease, exc)
            sent.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

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
        self._unsent.clear()
        for part in self._batch:  # the rest of the batch being handed out
            if isinstance(part, list):
                part.clear()
            else:
                part.error = None
        self.queue.clear()
        self.queue.append(None)
