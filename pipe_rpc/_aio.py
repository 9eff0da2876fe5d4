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

``submit`` is ``_futures.submit_call`` behind a server's proxy.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._connection import Connection
from ._errors import CallTimeoutError
from ._options import OnTimeout, RestartPolicy, StartMethod
from ._pending import PendingCall
from ._process import Server, spawn
from ._proxy import _Method

if TYPE_CHECKING:
    from ._limits import Limits

#: How long a loop waits before it tries again to write, while another writer holds
#: the pipe or the socket is full.
_WRITE_RETRY = 0.0005


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
