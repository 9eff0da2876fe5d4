"""``pipe_rpc.ray.pool()`` and ``RayPool``: one service on several Ray actors behind one proxy.

Each member is a ``RayServer`` with ``restart="on-failure"``: a dead actor
fails only its own calls and is replaced before its next one. A call goes to
the member with the fewest calls in flight. ``map()`` keeps a bounded number
of calls in flight as Ray object references (no thread per call).

This is a small pool of its own: ``pipe_rpc.Pool`` (contract section 9) is
being written at the same time, and the dispatch and ``map()`` here should
later be shared with it.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, TypeVar, cast

import ray

from ._errors import CallTimeoutError, ClientClosedError
from ._messages import Kind
from ._proxy import DEFAULT, Proxy, _Method, check_timeout
from ._ray_calls import OnTimeout
from ._ray_handle import Actor, finish_close
from ._ray_server import RayServer, check_options
from ._stats import ERROR, OK, TIMEOUT, snapshot
from ._stats_types import Stats

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
P = ParamSpec("P")


class _Call:
    """One call of ``map()`` on its way."""

    __slots__ = ("actor", "deadline", "member", "ref", "started")

    def __init__(
        self,
        member: int,
        actor: Actor,
        ref: ray.ObjectRef[Any],
        deadline: float | None,
        started: int,
    ) -> None:
        self.member = member
        self.actor = actor
        self.ref = ref
        self.deadline = deadline
        self.started = started  # for the member's counts


class RayPool(Generic[T]):
    """Several Ray actors serving the same service; made by ``pipe_rpc.ray.pool()``.

    ``proxy`` is typed as the service; ``with pool(...) as proxy:`` closes it.
    """

    def __init__(self, members: list[RayServer[T]], max_concurrency: int) -> None:
        self._members = members
        self._busy = [0] * len(members)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._window = 2 * len(members) * max_concurrency
        self.proxy: T = cast(T, Proxy(self, DEFAULT))

    @property
    def size(self) -> int:
        """The number of actors."""
        return len(self._members)

    @property
    def pids(self) -> list[int | None]:
        """The actors' worker pids, in member order."""
        return [member.pid for member in self._members]

    # -- dispatch ------------------------------------------------------------

    def _take(self) -> int:
        """The member with the fewest calls in flight (ties in turn); counts the call."""
        with self._lock:
            if self._closed:
                raise ClientClosedError("the pool was closed")
            count = len(self._members)
            start = next(self._turn) % count
            chosen = min(range(count), key=lambda i: (self._busy[i], (i - start) % count))
            self._busy[chosen] += 1
            return chosen

    def _release(self, member: int) -> None:
        with self._lock:
            self._busy[member] -= 1

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` on the least busy actor (the proxy's way in)."""
        member = self._take()
        try:
            return self._members[member].invoke(method, args, kwargs, timeout)
        finally:
            self._release(member)

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service (see ``RayServer.kind``)."""
        return self._members[0].kind(name)

    def get(self, name: str, timeout: float | None) -> Any:
        return self._members[0].get(name, timeout)

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running loop, on the least busy actor."""
        member = self._take()
        try:
            return await self._members[member].ainvoke(method, args, kwargs, timeout)
        finally:
            self._release(member)

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """``invoke`` whose outcome completes a future, on the least busy actor."""
        member = self._take()
        future = self._members[member].submit(method, args, kwargs, timeout)
        future.add_done_callback(lambda _: self._release(member))
        return future

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Iterator[Any]:
        """A generator method on the least busy actor."""
        member = self._take()
        self._release(member)  # a stream is not counted as a call in flight
        return self._members[member].stream(method, args, kwargs, timeout)

    def astream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """A generator or async generator method on the least busy actor, for ``async for``."""
        member = self._take()
        self._release(member)  # a stream is not counted as a call in flight
        return self._members[member].astream(method, args, kwargs, timeout)

    def stats(self) -> Stats:
        """A frozen snapshot of the counts of every actor, summed."""
        return snapshot([member._counters for member in self._members])

    def _method(self, method: Callable[..., Any]) -> tuple[str, float | None]:
        """The name and timeout of a bound method of this pool's proxy."""
        if not isinstance(method, _Method) or getattr(method._invoke, "__self__", None) is not self:
            raise TypeError(f"expected a method of this pool's proxy, got {method!r}")
        timeout = method._timeout
        if timeout is DEFAULT:
            timeout = self._members[0].timeout
        return method._name, timeout

    # -- map and broadcast ---------------------------------------------------

    def map(
        self, method: Callable[[A], R], iterable: Iterable[A], *, ordered: bool = True
    ) -> Iterator[R]:
        """``method(item)`` for every item, spread over the actors, a bounded number in flight.

        The iterable is consumed lazily. With ``ordered=False`` results come as
        they complete. A failed call's exception is raised at its place, and ends
        the iteration; calls still in flight are abandoned.
        """
        name, timeout = self._method(method)
        return cast(Iterator[R], self._map(name, iter(iterable), timeout, ordered))

    def _send(self, name: str, item: object, timeout: float | None) -> _Call:
        member = self._take()
        counters = self._members[member]._counters
        started = counters.begin(name)
        try:
            actor, ref = self._members[member]._submit(name, (item,), {})
        except BaseException:
            counters.end(name, started, ERROR)
            self._release(member)
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        return _Call(member, actor, ref, deadline, started)

    def _receive(self, call: _Call, name: str, timeout: float | None) -> Any:
        left = None if call.deadline is None else max(call.deadline - time.monotonic(), 1e-3)
        member = self._members[call.member]
        outcome = ERROR
        try:
            value = member._finish(call.actor, name, call.ref, left)
            outcome = OK
            return value
        except CallTimeoutError:
            outcome = TIMEOUT
            raise CallTimeoutError(f"{name}() got no reply within {timeout} s") from None
        finally:
            member._counters.end(name, call.started, outcome)
            self._release(call.member)

    def _map(
        self, name: str, items: Iterator[object], timeout: float | None, ordered: bool
    ) -> Iterator[Any]:
        pending: deque[_Call] = deque()
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < self._window:
                    item = next(items, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        pending.append(self._send(name, item, timeout))
                if not pending:
                    return
                if ordered:
                    call = pending.popleft()
                else:
                    call = self._first_done(pending)
                    pending.remove(call)
                yield self._receive(call, name, timeout)
        finally:
            for call in pending:  # abandoned: their replies are dropped
                self._members[call.member]._counters.end(name, call.started, ERROR)
                self._release(call.member)

    def _first_done(self, pending: deque[_Call]) -> _Call:
        """The first call of ``pending`` to complete, or the first past its deadline."""
        deadlines = [call.deadline for call in pending if call.deadline is not None]
        wait = None if not deadlines else max(min(deadlines) - time.monotonic(), 0.0)
        ready, _ = ray.wait([call.ref for call in pending], num_returns=1, timeout=wait)
        if ready:
            return next(call for call in pending if call.ref == ready[0])
        return min(pending, key=lambda call: call.deadline or 0.0)

    def broadcast(self, method: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        """``method(*args, **kwargs)`` on every actor at once; the results in member order."""
        name, timeout = self._method(method)
        calls = []
        with self._lock:
            if self._closed:
                raise ClientClosedError("the pool was closed")
        for index, member in enumerate(self._members):
            actor, ref = member._submit(name, args, kwargs)
            calls.append((index, actor, ref))
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[R] = []
        for index, actor, ref in calls:
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            results.append(self._members[index]._finish(actor, name, ref, left))
        return results

    # -- life ----------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Close every actor: their calls in flight may finish for ``timeout`` s in all.

        Idempotent.
        """
        with self._lock:
            self._closed = True
        closing = []
        for member in self._members:
            with member._lock:
                already, member._closed = member._closed, True
            actor = member._actor
            closing.append((actor, None if already else actor.begin_close()))
        finish_close(closing, timeout)

    def __enter__(self) -> T:
        if self._closed:
            raise ClientClosedError("the pool was closed")
        return self.proxy

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pipe_rpc.ray.RayPool size={self.size} pids={self.pids}>"


_END = object()


def pool(
    factory: Callable[[], T],
    /,
    *,
    size: int,
    timeout: float | None = None,
    on_timeout: OnTimeout = "abandon",
    max_concurrency: int = 1,
    name: str | None = None,
    ray_options: dict[str, Any] | None = None,
    start_timeout: float | None = None,
    start_method: None = None,
    limits: None = None,
    untrusted: Literal[False] = False,
) -> RayPool[T]:
    """Start ``size`` Ray actors serving ``factory()`` and return the pool.

    The actors start in parallel; ``pool()`` returns when all are answering.
    A dead actor fails only its own calls and is replaced before its next one;
    a call is never retried. The options are ``spawn()``'s.

    Raises:
        ValueError: an option is out of range, or cannot be honoured on Ray.
        StartupError: the factory raised, or an actor did not start.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    options = check_options(
        on_timeout=on_timeout,
        restart="on-failure",
        max_concurrency=max_concurrency,
        ray_options=ray_options,
        start_method=start_method,
        limits=limits,
        untrusted=untrusted,
    )
    start_timeout = check_timeout(start_timeout, "start_timeout")
    check_timeout(timeout)
    actor_options = {
        **options,
        "max_concurrency": max_concurrency,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    member = functools.partial(
        RayServer[T],
        factory,
        timeout=timeout,
        on_timeout=on_timeout,
        restart="on-failure",
        max_concurrency=max_concurrency,
        ray_options=options,
        start_timeout=start_timeout,
    )
    launched = [Actor.launch(factory, actor_options) for _ in range(size)]
    try:
        members = [
            member(name=None if name is None else f"{name}-{index}", launched=actor)
            for index, actor in enumerate(launched)
        ]
    except BaseException:
        for actor in launched:
            actor.kill("the pool failed to start")
        raise
    return RayPool(members, max_concurrency)
