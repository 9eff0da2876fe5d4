"""``pool()`` and ``Pool[T]``: many children behind one proxy.

Theory of operation
-------------------

A pool is a set of ``Server`` objects and a dispatcher; it has no process code
of its own. Each child is a *worker*: a ``Server`` (``restart="never"``), the
calls in flight on it and the calls it was given. A worker is *starting*
(launched, its hello not read yet), *ready* (it takes calls) or *retiring* (it
takes no new call, and is closed once its calls in flight are done). Each of
the pool's ``size`` slots holds a starting or ready worker, or waits to start
one again.

Dispatch. A call takes the ready worker with the fewest calls in flight (ties
go to the one that has been ready longest), under one lock that guards counters only, and gives it
back when it returns. No process is started, greeted or closed under the lock.

Chores without a thread. The pool has no thread of its own: a call giving its
worker back does the chores that are due (launch a replacement, read the
hellos that came, close a drained worker), and a call that finds no ready
worker does them while it waits for one. So an idle pool does nothing, and
under the ``fork`` start method a parent that calls from one thread never forks
while it has other threads. A start is two steps (``Server._start(False)``,
then ``Server._greet``): the pool's first children all start before it waits
for any hello, and a replacement never holds up a call to the other children.

Death and recycling. A call that fails because its child is gone
(``ConnectionLostError``, ``ProtocolError``, or a timeout that killed it)
retires that worker, and its slot launches a replacement; the call is not
retried, and other calls never went to it. A worker found dead before a call
is sent is retired and the call goes elsewhere. After ``max_calls_per_child``
calls given, or once its resident memory is above ``max_memory_per_child``
after a call, a worker retires the same way, but alive: it finishes its calls
in flight first. A replacement whose start fails is tried again after a delay
that doubles from 0.1 s up to 10 s, and each failure is logged (WARNING on
``"pipe_rpc"``); while no child runs, a caller waiting for one gets the
``StartupError`` of a start that failed while it waited.

``map`` has no thread of its own: items go as submitted calls, sent only to a
worker with a free place (fewer than ``max_concurrency`` calls in flight), one
item per call until items are seen to be quick, then in chunks of about a
millisecond of the child's work (``_chunks``). The consumer's thread draws items
from the iterable, a bounded window ahead of the results it has handed out, and
reads the replies (see ``_pool_map``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, cast

from ._errors import ClientClosedError
from ._futures import Again
from ._liveness import check_owner, fork_generation
from ._messages import Kind
from ._options import OnTimeout, StartMethod, server_options
from ._pool_children import Lease, _Worker
from ._pool_map import Map, map_results
from ._pool_streams import PoolAsyncStream, PoolStream
from ._pool_workers import Workers, default_size
from ._process import Server
from ._proxy import DEFAULT, Proxy, _Method
from ._stats import snapshot

if TYPE_CHECKING:
    from ._limits import Limits
    from ._stats_types import Stats

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
P = ParamSpec("P")


class Pool(Generic[T]):
    """Many children serving the same service behind one typed proxy; made by ``pool()``.

    Each call through ``proxy`` goes to the child with the fewest calls in
    flight. A child that dies fails only the calls it had and is replaced;
    ``map`` spreads a one-argument method over an iterable, ``broadcast`` calls
    every child.
    """

    def __init__(
        self, workers: Workers, timeout: float | None, max_concurrency: int, chunks: bool = True
    ) -> None:
        self._workers = workers
        self._timeout = timeout
        self._places = max_concurrency
        #: ``map`` may send quick items in chunks (not to untrusted children, whose
        #: replies are decoded one by one, nor when children are recycled by calls).
        self._chunks = chunks
        self._generation = fork_generation()
        self._close_lock = threading.Lock()
        self.proxy: T = cast(T, Proxy(self, DEFAULT))
        workers.start_all()

    # -- calls ----------------------------------------------------------------------

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` on the least busy child (the proxy's way in)."""
        return self._call(method, args, kwargs, timeout, None)

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        limit: int | None,
    ) -> Any:
        if self._generation != fork_generation():
            check_owner(self._generation, "pool")
        seconds = self._timeout if timeout is DEFAULT else timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        workers = self._workers
        lease = Lease()
        try:  # taken inside the try: an interrupt anywhere after gives it back (see ``Lease``)
            worker, waited = workers.take(lease, deadline, limit)
            if waited and deadline is not None:  # the wait for a child counts against the call
                timeout = max(deadline - time.monotonic(), 1e-6)
            result = worker.server.invoke(method, args, kwargs, timeout)
            workers.give_back(lease)
        except BaseException as exc:
            workers.give_back(lease, exc)
            raise
        return result

    def _deadline(self, timeout: float | None) -> float | None:
        if self._generation != fork_generation():
            check_owner(self._generation, "pool")
        seconds = self._timeout if timeout is DEFAULT else timeout
        return None if seconds is None else time.monotonic() + seconds

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running event loop (``acall``'s way in)."""
        workers = self._workers
        lease = Lease()
        try:
            worker = workers.take_now(lease) or await _take_off_loop(
                workers, lease, self._deadline(timeout)
            )
            result = await worker.server.ainvoke(method, args, kwargs, timeout)
            workers.give_back(lease)
        except BaseException as exc:  # a cancellation too
            workers.give_back(lease, exc)
            raise
        return result

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """``invoke`` whose outcome completes a future (``submit``'s way in); the child
        counts the call until the future is done."""
        workers = self._workers
        lease = Lease()
        try:
            worker, _ = workers.take(lease, self._deadline(timeout))
            return self._submit_to(worker, lease, method, args, kwargs, timeout)
        except BaseException as exc:
            workers.give_back(lease, exc)
            raise

    def _submit_to(
        self,
        worker: _Worker,
        lease: Lease,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        first: Callable[[Future[Any]], object] | None = None,
    ) -> Future[Any]:
        """Submit on ``worker``, taken into ``lease``, which is given back as the future
        completes (after ``first`` is called with it: the worker may then be closed).
        If this raises, the caller's ``except`` gives it back: at once if the call
        could not be sent, or if an interrupt lands before the callback is added (or
        after: the lease is given back once, whichever comes first)."""
        future = worker.server.submit(method, args, kwargs, timeout)
        if first is not None:
            future.add_done_callback(first)
        future.add_done_callback(Again(self._workers.future_done, lease))  # see ``Again``
        return future

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Iterator[Any]:
        """Call a generator method on one child: its items, as they come. The child counts
        the call until the iterator ends, is closed or is dropped."""
        workers = self._workers
        lease = Lease()
        try:
            worker, _ = workers.take(lease, self._deadline(timeout))
            items = worker.server.stream(method, args, kwargs, timeout)
            return PoolStream(items, functools.partial(workers.give_back, lease))
        except BaseException as exc:
            workers.give_back(lease, exc)
            raise

    def astream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """Call a generator or async generator method: an async iterator of its items."""
        workers = self._workers
        lease = Lease()
        try:
            worker, _ = workers.take(lease, self._deadline(timeout))
            items = worker.server.astream(method, args, kwargs, timeout)
            return PoolAsyncStream(items, functools.partial(workers.give_back, lease))
        except BaseException as exc:
            workers.give_back(lease, exc)
            raise

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service (every child serves the same one)."""
        return self._workers.any_ready(self._deadline(DEFAULT)).server.kind(name)

    def get(self, name: str, timeout: float | None) -> Any:
        """Read the service's public property or data attribute ``name`` on one child."""
        workers = self._workers
        lease = Lease()
        try:
            worker, _ = workers.take(lease, self._deadline(timeout))
            value = worker.server.get(name, timeout)
            workers.give_back(lease)
        except BaseException as exc:
            workers.give_back(lease, exc)
            raise
        return value

    def map(
        self,
        method: Callable[[A], R],
        iterable: Iterable[A],
        *,
        ordered: bool = True,
        chunksize: int | Literal["auto"] = 1,
    ) -> Iterator[R]:
        """Call a one-argument ``method`` of ``proxy`` on each item, on all children at once.

        ``pool.map(pool.proxy.parse, paths)`` yields each result, in the order of
        ``iterable`` (``ordered=False``: as they come). Items are drawn lazily, a
        bounded window ahead; each child has at most ``max_concurrency`` calls of
        them in flight. A failed item raises its exception from the ``next()`` that
        would have returned its result, and the iterator goes on with the next
        items. Closing the iterator (``close()``, or dropping it) stops sending items.

        Each item is a call of its own, so that a crash fails only the item that
        caused it. For many quick items, ``chunksize=N`` sends N items per call,
        and ``chunksize="auto"`` sizes each call to about a millisecond of the
        child's work; a crash then fails every item of its child's chunks that
        had no result yet. Items go one per call anyway when the method has a
        timeout (each item has its own), to untrusted children, and with
        ``max_calls_per_child``.

        Raises:
            TypeError: ``method`` is not a method of this pool's proxy.
            ValueError: ``chunksize`` is not an int >= 1 or ``"auto"``.
        """
        name, timeout = self._method_name(method, "map")
        if chunksize != "auto" and (
            isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
        ):
            raise ValueError(f"chunksize must be an int >= 1 or 'auto', got {chunksize!r}")
        return map_results(Map(self, name, timeout, iter(iterable), ordered, chunksize))

    def broadcast(self, method: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        """Call ``method`` (a method of ``proxy``) on every running child, one after the
        other, and return the results in child order.

        Children still starting, or found dead, are left out. The first call that
        raises ends it.

        Raises:
            TypeError: ``method`` is not a method of this pool's proxy.
        """
        name, timeout = self._method_name(method, "broadcast")
        if self._generation != fork_generation():
            check_owner(self._generation, "pool")
        workers = self._workers
        workers.notice_deaths()
        results: list[R] = []
        for worker in workers.ready_in_order():
            lease = Lease()
            try:
                if not workers.claim(worker, lease):
                    continue
                results.append(worker.server.invoke(name, args, kwargs, timeout))
                workers.give_back(lease)
            except BaseException as exc:
                workers.give_back(lease, exc)
                raise
        return results

    def _method_name(self, method: object, what: str) -> tuple[str, Any]:
        if isinstance(method, _Method):
            invoke = method._invoke
            if getattr(invoke, "__self__", None) is self:
                return method._name, method._timeout
        raise TypeError(f"{what}() takes a method of this pool's proxy, got {method!r}")

    # -- state ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """How many children the pool keeps."""
        return len(self._workers.slots)

    @property
    def pids(self) -> list[int]:
        """The pids of the children in the pool now, in child order (starting ones too)."""
        if self._generation != fork_generation():
            check_owner(self._generation, "pool")
        self._workers.notice_deaths()
        return self._workers.pids()

    def stats(self) -> Stats:
        """A frozen snapshot of the counts of every child the pool has had, summed:
        per method calls, errors, timeouts, calls in flight and recent latency; the
        children started, restarted (replaced), and dead by reason."""
        workers = self._workers
        stats = snapshot(workers.counters())
        # Each child is a server of its own, started once: the children beyond the
        # first ``size`` replaced others.
        import attrs

        return attrs.evolve(stats, restarts=max(0, stats.starts - len(workers.slots)))

    # -- closing --------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop every child at once: ask, wait up to ``timeout`` s, then SIGTERM, then
        SIGKILL; reap them. Idempotent; calls in flight fail with ``ClientClosedError``."""
        with self._close_lock:
            if self._generation != fork_generation():
                return  # a forked copy: the children are not ours
            self._workers.close(timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close()`` without blocking the event loop."""
        import asyncio

        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> T:
        if self._workers.closed:
            raise ClientClosedError("the pool was closed")
        return self.proxy

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> T:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._workers.closed else f"pids={self._workers.pids()}"
        return f"<pipe_rpc.Pool size={self.size} {state}>"


async def _take_off_loop(workers: Workers, lease: Lease, deadline: float | None) -> _Worker:
    """No child ready: wait for one in a thread, not on the event loop. If the task
    is cancelled meanwhile, the thread takes on: it gives back what it takes."""
    import asyncio

    gone: list[bool] = []

    def take() -> _Worker:
        worker, _ = workers.take(lease, deadline)
        if gone:  # read after the take: else the task's ``except`` finds it in the lease
            workers.give_back(lease)
        return worker

    try:
        return await asyncio.to_thread(take)
    except BaseException:
        gone.append(True)  # before the caller's ``except`` gives the lease back
        raise


def pool(
    factory: Callable[[], T],
    /,
    *,
    size: int | None = None,
    timeout: float | None = None,
    start_method: StartMethod | None = None,
    on_timeout: OnTimeout = "abandon",
    max_concurrency: int = 1,
    limits: Limits | None = None,
    untrusted: bool = False,
    name: str | None = None,
    allowed_types: Iterable[type] = (),
    start_timeout: float | None = None,
    max_calls_per_child: int | None = None,
    max_memory_per_child: int | None = None,
) -> Pool[T]:
    """Start ``size`` children serving ``factory()`` and return the pool of them.

    The children start at once; ``pool()`` returns when every one has answered.
    The options shared with ``spawn()`` apply to each child. ``size=None`` is the
    number of CPUs this process may use. ``max_calls_per_child=N`` replaces a
    child after N calls; ``max_memory_per_child`` (bytes) replaces a child whose
    resident memory is above it after a call. Neither makes a call fail: the
    child takes no new call and is closed once its calls are done.

    Raises:
        ValueError: an option is out of range.
        StartupError: a child's factory raised, a child died while starting, or one
            did not answer within ``start_timeout`` seconds; every child is stopped.
    """
    options = server_options(
        factory,
        timeout=timeout,
        start_method=start_method,
        on_timeout=on_timeout,
        max_concurrency=max_concurrency,
        limits=limits,
        untrusted=untrusted,
        name=name,
        allowed_types=allowed_types,
        start_timeout=start_timeout,
    )
    size = default_size() if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be None or an int >= 1, got {size!r}")
    for option, value in [
        ("max_calls_per_child", max_calls_per_child),
        ("max_memory_per_child", max_memory_per_child),
    ]:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{option} must be None or an int >= 1, got {value!r}")
    make = functools.partial(Server, factory, options, wait=False)
    workers = Workers(make, size, options.start_timeout, max_calls_per_child, max_memory_per_child)
    chunks = not untrusted and max_calls_per_child is None
    return Pool[T](workers, options.timeout, max_concurrency, chunks)
