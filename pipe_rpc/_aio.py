"""The asyncio and futures front-ends over the connection core: ``acall``, ``submit``.

``acall`` registers a call whose waiter is a future of the running loop, writes
its frame without ever blocking the loop (the write lock is only tried; a frame
the socket does not take at once is finished as the socket drains), and awaits
the future. While a loop has calls in flight on a connection, the loop watches
the pipe (``add_reader``) and the server process's sentinel, and reads through
``Connection.read_nowait``: the same reading and settling as every sync caller,
which may as well settle the loop's calls itself. Cancelling the awaiting task
ends the call as its timeout would (it is abandoned; the server layer kills the
child under ``on_timeout="kill"``).

``submit`` registers a call whose waiter completes a ``concurrent.futures.Future``
and returns once the request is written; one bare thread per connection waits,
like any sync caller, for the calls submitted, oldest first, and exits when none
is left.
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._connection import Connection, PendingCall
from ._errors import CallTimeoutError
from ._process import OnTimeout, RestartPolicy, Server, StartMethod, spawn
from ._proxy import _Method
from ._stats import ERROR, TIMEOUT, MethodCounts
from ._transport import WriteTimeout

if TYPE_CHECKING:
    from ._limits import Limits

#: How long a loop waits before it tries again to write, while another writer holds
#: the pipe or the socket is full.
_WRITE_RETRY = 0.0005
#: How long a connection's ``submit`` thread waits for the next call before it ends.
_LINGER = 0.25
#: How long it leaves a call to a ``result()`` that has been reading replies itself.
_GRACE = 0.002


class _LoopWaiter:
    """Completes a loop's future when its call is settled, from whichever thread."""

    __slots__ = ("future", "loop", "thread")
    leads = False

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        self.loop = loop
        self.future = future
        self.thread = threading.get_ident()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            _resolve(self.future)
        else:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future)
            except RuntimeError:  # the loop is closed: nobody awaits it any more
                pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _LoopWatch:
    """A loop's watch over one connection's pipe, while it has calls in flight."""

    def __init__(self, core: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop
        self.calls = 0

    def attach(self) -> None:
        if not self.calls:
            core = self.core
            self.loop.add_reader(core.pipe.fd, core.read_nowait)
            sentinel = core.pipe.sentinel
            if sentinel is not None and sentinel >= 0:
                self.loop.add_reader(sentinel, core.read_nowait, True)
        self.calls += 1

    def detach(self) -> None:
        self.calls -= 1
        if not self.calls:
            core = self.core
            self.loop.remove_reader(core.pipe.fd)
            sentinel = core.pipe.sentinel
            if sentinel is not None and sentinel >= 0:
                self.loop.remove_reader(sentinel)


#: Each connection's watch by each loop that has used it.
_WATCHES: weakref.WeakKeyDictionary[Connection, dict[asyncio.AbstractEventLoop, _LoopWatch]] = (
    weakref.WeakKeyDictionary()
)


def _watch(core: Connection, loop: asyncio.AbstractEventLoop) -> _LoopWatch:
    by_loop = _WATCHES.setdefault(core, {})
    watch = by_loop.get(loop)
    if watch is None:
        watch = by_loop[loop] = _LoopWatch(core, loop)
    return watch


async def call_async(
    core: Connection,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
) -> Any:
    """One call awaited on the running loop (the core of ``acall``)."""
    core.check_usable()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    pending = PendingCall(method)
    pending.waiter = _LoopWaiter(loop, future)
    watch = _watch(core, loop)
    call_id = 0
    attached = False
    try:
        call_id, frame = core.protocol.start(method, args, kwargs, pending)
        await _write(core, frame)
        if not watch.calls:  # the loop's one call here: its reply most often comes at once
            core.read_nowait(spin=True)
        if pending.done:
            return pending.outcome()
        watch.attach()
        attached = True
        if timeout is None:
            await future
        else:
            try:
                async with asyncio.timeout(timeout):
                    await future
            except TimeoutError:
                if not pending.settled():
                    raise CallTimeoutError(f"{method}() timed out after {timeout} s") from None
    except BaseException:  # a timeout, a cancellation: this call alone ends
        if call_id and not pending.settled():
            core.abandon(call_id)
        raise
    finally:
        if attached:
            watch.detach()
    return pending.outcome()


async def wait_async(core: Connection, call: PendingCall) -> None:
    """Await, on the running loop, until ``call`` has something (``done``)."""
    if call.done:
        return
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    call.waiter = _LoopWaiter(loop, future)
    watch = _watch(core, loop)
    watch.attach()
    try:
        while not call.done:
            if core.broken is not None:
                raise core.fresh_broken()
            await future
            if not call.done:
                future = loop.create_future()
                call.waiter = _LoopWaiter(loop, future)
    finally:
        watch.detach()


async def _write(core: Connection, frame: list[Any]) -> None:
    """Write ``frame`` on the pipe without blocking the loop."""
    delay = _WRITE_RETRY
    while True:
        went = core.write_nowait(frame)
        if went:
            return
        if went is None:  # part of it went: finish it as the socket drains
            while not core.flush_nowait():
                await asyncio.sleep(_WRITE_RETRY)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)


# -- concurrent.futures ----------------------------------------------------------


#: Makes only the first ``cancel()`` of a ``CallFuture`` act (it is rare: one lock for all).
_CANCELS = threading.Lock()


class CallFuture(Future[Any]):
    """The future of a submitted call; ``cancel()`` acts as the call's timeout.

    ``result()`` waits for the reply in the calling thread, as a sync call does (it
    leads the reading or follows whoever does), rather than for the connection's
    thread to hand the outcome over: that hand-over costs more than the call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_cancel: list[Any] = []  # callables run when the call is cancelled
        self.cancel_seen = False
        #: ``wait(deadline)``: wait in this thread until the call is settled or ``deadline``.
        self.wait: Callable[[float | None], None] | None = None
        #: The server's counts of the call's method, and when it started; the outcome
        #: is counted as the future completes (once: a second completion raises).
        self.counts: MethodCounts | None = None
        self.started = 0

    def result(self, timeout: float | None = None) -> Any:
        wait = self.wait
        # ``_state`` read without the condition: a hint only (``done()`` would take it).
        if wait is not None and self._state != "FINISHED":
            end = None if timeout is None else time.monotonic() + timeout
            wait(end)
            if end is not None:
                timeout = max(0.0, end - time.monotonic())
        return super().result(timeout)

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        if self.counts is not None:
            self.counts.ok(self.started)

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        if self.counts is not None:
            timed_out = isinstance(exception, CallTimeoutError)
            self.counts.failed(self.started, TIMEOUT if timed_out else ERROR)

    def cancel(self) -> bool:
        if not super().cancel():  # answered already
            return False
        with _CANCELS:  # ``Future.cancel`` is true again once cancelled: act on the first
            if self.cancel_seen:
                return True
            self.cancel_seen = True
        if self.counts is not None:
            self.counts.failed(self.started, TIMEOUT)
        for callback in self.on_cancel:  # abandon the call; kill its child if that is the policy
            callback()
        return True


class _FutureWaiter:
    """Completes a ``concurrent.futures.Future`` with its call's outcome."""

    __slots__ = ("future", "pending")
    leads = False

    def __init__(self, future: Future[Any], pending: PendingCall) -> None:
        self.future = future
        self.pending = pending

    def wake(self) -> None:
        pending, future = self.pending, self.future
        if not pending.done:
            return
        try:  # a future already completed or cancelled raises (``done()`` costs as much)
            if pending.ok:
                future.set_result(pending.value)
            else:
                future.set_exception(pending.value)
        except Exception:  # cancelled or completed meanwhile (InvalidStateError)
            pass


class _Pump:
    """One bare thread per connection that waits for submitted calls, oldest first.

    It stays ``_LINGER`` seconds after the last one for the next: a thread start
    costs more than a call, and ``submit(...).result()`` in a loop would pay one a call.
    While the futures are waited on by ``result()`` (whose thread reads the reply
    itself), it gives each call ``_GRACE`` seconds before it waits for it too, and
    ``add`` does not wake it: it looks every ``_GRACE`` seconds instead. A second
    thread woken for every call costs more than the call as well.
    """

    def __init__(self, core: Connection) -> None:
        self.core = core
        self.queue: deque[tuple[PendingCall, int, float | None, CallFuture]] = deque()
        self.lock = threading.Lock()
        self.more = threading.Condition(self.lock)
        self.running = False
        self.dozing = False  # waiting for ``add`` to wake it, not looking by itself
        self.waited = False  # the last call was settled by a ``result()`` in its thread
        self._nap = threading.Lock()
        self._nap.acquire()  # never released: ``acquire(timeout=...)`` on it is a nap

    def add(self, item: tuple[PendingCall, int, float | None, CallFuture]) -> None:
        with self.lock:
            self.queue.append(item)
            start = not self.running
            self.running = True
            if self.dozing or not self.waited:
                self.more.notify()
        if start:
            _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self.lock:
                while not self.queue:
                    now = time.monotonic()
                    if now - idle_since >= _LINGER:
                        self.running = False
                        return
                    self.dozing = not self.waited
                    self.more.wait(_LINGER if self.dozing else _GRACE)
                    self.dozing = False
                pending, call_id, deadline, future = self.queue[0]
            try:
                if self.waited and not pending.done:
                    self._nap.acquire(True, _GRACE)
                if not pending.done:
                    self.waited = False
                    self.core._wait_pipe(pending, deadline)
                if not pending.done and not future.done():
                    self.core.abandon(call_id)
                    if not pending.settled():
                        _time_out(future, pending, self.core)
            except BaseException as exc:  # never leave a future waiting for ever
                if not future.done():
                    future.set_exception(exc)
            finally:
                with self.lock:
                    self.queue.popleft()
                idle_since = time.monotonic()


def _wait_for(pump: _Pump, pending: PendingCall, deadline: float | None, end: float | None) -> None:
    """A ``result()`` waits for its call in its own thread, until the earlier of the
    call's deadline (where the connection's thread takes over) and ``end``."""
    if end is not None and (deadline is None or end < deadline):
        deadline = end
    pump.core._wait_pipe(pending, deadline)
    if pending.done:
        pump.waited = True


def _time_out(future: CallFuture, pending: PendingCall, core: Connection) -> None:
    if core.broken is not None:
        error: BaseException = core.broken
    else:
        error = CallTimeoutError(f"{pending.method}() timed out")
    try:
        future.set_exception(error)
    except Exception:  # cancelled meanwhile
        pass


_PUMPS_LOCK = threading.Lock()


def submit_call(
    core: Connection,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
) -> CallFuture:
    """Register and write one call; its outcome completes the returned future."""
    core.check_usable()
    future = CallFuture()
    counters = core.counters
    if counters is not None:
        future.counts = counts = counters.of(method)
        next(counts.started)
        future.started = time.perf_counter_ns()
    pending = PendingCall(method)
    pending.waiter = _FutureWaiter(future, pending)
    deadline = None if timeout is None else time.monotonic() + timeout
    call_id = 0
    try:
        call_id, frame = core.protocol.start(method, args, kwargs, pending)
        core._send(frame, deadline)
    except WriteTimeout:
        core.abandon(call_id)
        raise CallTimeoutError(f"{method}() timed out after {timeout} s waiting to send") from None
    except BaseException:
        if call_id:
            core.abandon(call_id)
        raise
    if pending.done:  # settled already (the connection broke as it was sent)
        pending.waiter.wake()
        return future
    future.on_cancel.append(functools.partial(core.abandon, call_id))
    pump = core.pump
    if pump is None:
        with _PUMPS_LOCK:
            pump = core.pump
            if pump is None:
                pump = core.pump = _Pump(core)
    future.wait = functools.partial(_wait_for, pump, pending, deadline)
    pump.add((pending, call_id, deadline, future))
    return future


# -- the public functions ---------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _method_of(method: object, what: str) -> _Method:
    if not isinstance(method, _Method):
        raise TypeError(f"{what}() takes a method of a pipe_rpc proxy (proxy.name), got {method!r}")
    return method


@overload
def submit(
    method: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
) -> Future[R]: ...
@overload
def submit(method: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...
def submit(method: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Future[Any]:
    """Call a proxy method without waiting: a future of its outcome.

    Returns once the request is on its way. ``future.cancel()`` on a call not yet
    answered returns True and acts as that call's timeout at that moment: it is
    abandoned (its late reply is dropped), or under ``on_timeout="kill"`` its child
    is killed.

    Example::

        future = pipe_rpc.submit(calc.add, 1, 2)
        assert future.result() == 3

    Raises:
        TypeError: ``method`` is not a method of a pipe_rpc proxy.
        SerializationError: an argument would not pickle; nothing was sent.
    """
    bound = _method_of(method, "submit")
    return bound._invoker.submit(bound._name, args, kwargs, bound._timeout)


@overload
async def acall(
    method: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
) -> R: ...
@overload
async def acall(method: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
async def acall(method: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
    """Await a proxy call without blocking the event loop and without a thread.

    Many calls may be in flight at once from one loop on one proxy. Cancelling the
    awaiting task acts as the call's timeout (abandon, or kill under
    ``on_timeout="kill"``); the proxy stays usable. A method whose service method
    is ``async def`` is accepted too: the result is what the coroutine returns.

    Example::

        total = await pipe_rpc.acall(calc.add, 1, 2)

    Raises:
        TypeError: ``method`` is not a method of a pipe_rpc proxy.
        CallTimeoutError: the call's timeout passed; so does every error a sync call
            raises, in the same cases.
    """
    bound = _method_of(method, "acall")
    return await bound._invoker.ainvoke(bound._name, args, kwargs, bound._timeout)


@overload
def astream(
    method: Callable[P, AsyncIterator[R]], /, *args: P.args, **kwargs: P.kwargs
) -> AsyncIterator[R]: ...
@overload
def astream(
    method: Callable[P, Iterator[R]], /, *args: P.args, **kwargs: P.kwargs
) -> AsyncIterator[R]: ...
def astream(method: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Any]:
    """Iterate a streaming proxy method (a generator or async generator method) from
    async code, with the same flow control as a sync iterator.

    Example::

        async for row in pipe_rpc.astream(db.rows, "select ..."):
            ...

    Closing the async iterator (``aclose()``, leaving ``async for`` early) stops the
    child's generator; a cancelled wait does too.

    Raises:
        TypeError: ``method`` is not a method of a pipe_rpc proxy.
    """
    bound = _method_of(method, "astream")
    return bound._invoker.astream(bound._name, args, kwargs, bound._timeout)


async def aspawn(
    factory: Callable[[], T],
    /,
    *,
    timeout: float | None = None,
    start_method: StartMethod | None = None,
    on_timeout: OnTimeout = "abandon",
    restart: RestartPolicy = "never",
    max_concurrency: int = 1,
    limits: Limits | None = None,
    untrusted: bool = False,
    name: str | None = None,
    allowed_types: Iterable[type] = (),
    max_reply_bytes: int | None = None,
    start_timeout: float | None = None,
) -> Server[T]:
    """``spawn()`` without blocking the event loop: the same keywords, the same ``Server``.

    The child is started, and its hello awaited, on a worker thread; under
    ``start_method="fork"`` it is started on the loop's own thread (forking from
    another thread would fork a multi-threaded parent), which takes a few
    milliseconds.

    Example::

        async with await pipe_rpc.aspawn(Calculator) as calc:
            assert await pipe_rpc.acall(calc.add, 1, 2) == 3
    """
    start = functools.partial(
        spawn,
        factory,
        timeout=timeout,
        start_method=start_method,
        on_timeout=on_timeout,
        restart=restart,
        max_concurrency=max_concurrency,
        limits=limits,
        untrusted=untrusted,
        name=name,
        allowed_types=allowed_types,
        max_reply_bytes=max_reply_bytes,
        start_timeout=start_timeout,
    )
    if start_method == "fork":
        return start()
    return await asyncio.to_thread(start)
