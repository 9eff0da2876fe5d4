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

``map`` runs one thread per call it may have in flight (``size *
max_concurrency``), each sending a call only to a worker with a free place
(fewer than ``max_concurrency`` calls in flight), so no call waits behind
another in a child, and a crash fails only the items that were running in it.
The consumer's thread draws items from the iterable, at most a bounded window
ahead of the results it has handed out.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    ProtocolError,
    StartupError,
)
from ._liveness import check_owner, fork_generation
from ._process import OnTimeout, Server, StartMethod, check_options
from ._proxy import DEFAULT, Proxy, _Method, check_timeout, fresh_error

if TYPE_CHECKING:
    import logging
    import queue

    from ._limits import Limits

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
P = ParamSpec("P")

#: The first delay before a failed start is tried again; it doubles up to ``_MAX_BACKOFF``.
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
#: The longest a call waiting for a child sleeps before it looks again.
_LOOK_AGAIN = 0.05
#: How far ``map`` runs ahead of the results handed out, in calls per place in the pool.
_MAP_WINDOW = 2

_STARTING, _READY, _RETIRING = "starting", "ready", "retiring"


def _log() -> logging.Logger:
    """The ``"pipe_rpc"`` logger (``logging`` is imported on first use: a child never needs it)."""
    import logging

    logger = logging.getLogger("pipe_rpc")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return logger


def _default_size() -> int:
    count: Callable[[], int | None] = getattr(os, "process_cpu_count", os.cpu_count)
    return count() or 1


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int) -> int | None:
    """The resident memory of process ``pid`` in bytes, ``None`` if it cannot be read.

    Linux: ``/proc/<pid>/statm`` (what ``VmRSS`` shows). Elsewhere: ``ps -o rss=``,
    a process per reading.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux, and the process is gone
    except (OSError, ValueError, IndexError):
        return None
    import subprocess

    try:
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=False,
        ).stdout
        return int(out.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class _Worker:
    """One child of the pool and its counters (guarded by the pool's lock)."""

    __slots__ = ("deadline", "given", "greeting", "in_flight", "pid", "server", "slot", "state")

    def __init__(self, server: Server[Any], slot: _Slot, start_timeout: float | None) -> None:
        self.server = server
        self.slot = slot
        self.pid = cast(int, server.pid)
        self.state = _STARTING
        self.in_flight = 0
        self.given = 0  # calls given to it, counted when they are
        self.greeting = False  # a thread is reading its hello
        self.deadline = None if start_timeout is None else time.monotonic() + start_timeout


class _Slot:
    """A place in the pool: its worker, or when to start one again."""

    __slots__ = ("due", "failures", "index", "worker")

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: _Worker | None = None
        self.failures = 0  # starts that failed in a row
        self.due = 0.0  # when to launch, while it has no worker


class _Workers:
    """The pool's children: dispatch, chores, replacement, close. See the module docstring."""

    def __init__(
        self,
        make: Callable[[], Server[Any]],
        size: int,
        start_timeout: float | None,
        max_calls: int | None,
        max_memory: int | None,
    ) -> None:
        self._make = make
        self.start_timeout = start_timeout
        self._max_calls = max_calls
        self._max_memory = max_memory
        self._cond = threading.Condition(threading.Lock())
        self.slots = [_Slot(index) for index in range(size)]
        self._ready: list[_Worker] = []
        self._starting: list[_Worker] = []
        self._waiting: list[_Slot] = []  # slots to launch a worker in, at their ``due``
        self._drained: list[_Worker] = []  # retired, no call in flight: to close
        self._retiring: set[_Worker] = set()
        self.failures = 0  # starts that failed, ever
        self.last_failure: StartupError | None = None
        self.closed = False

    # -- starting ---------------------------------------------------------------

    def start_all(self) -> None:
        """Launch every slot's child, then read every hello; on any failure stop them all."""
        try:
            for slot in self.slots:
                slot.worker = _Worker(self._make(), slot, self.start_timeout)
                self._starting.append(slot.worker)
            for slot in self.slots:
                assert slot.worker is not None
                slot.worker.greeting = True
                self._greet(slot.worker)
                self._starting.remove(slot.worker)
                slot.worker.state = _READY
                self._ready.append(slot.worker)
        except BaseException:
            self.close(1.0)
            raise

    def _greet(self, worker: _Worker) -> None:
        """Read ``worker``'s hello, within its start deadline (``StartupError`` past it)."""
        if worker.deadline is None:
            worker.server._greet(None)
        else:  # if the hello is in, a moment is enough to read it
            worker.server._greet(max(worker.deadline - time.monotonic(), 1e-3))

    def _launch(self, slot: _Slot) -> None:
        """Start a new child in ``slot`` (outside the lock); its hello is read later."""
        try:
            server = self._make()
        except Exception as exc:  # the process could not start (out of processes, say)
            failure = StartupError(f"a replacement child could not be started: {exc!r}")
            failure.__cause__ = exc
            self._start_failed(slot, failure)
            return
        worker = _Worker(server, slot, self.start_timeout)
        with self._cond:
            if not self.closed:
                slot.worker = worker
                self._starting.append(worker)
                return
        server.close(1.0)

    def _greet_later(self, worker: _Worker) -> None:
        """Read the hello of a replacement that has answered (or is out of time)."""
        try:
            self._greet(worker)
        except StartupError as exc:
            worker.server.close(1.0)
            self._start_failed(worker.slot, exc, worker)
            return
        except BaseException:
            with self._cond:
                worker.greeting = False
            raise
        with self._cond:
            if self.closed:  # close() has it, and closes it
                return
            self._starting.remove(worker)
            worker.state = _READY
            self._ready.append(worker)
            worker.slot.failures = 0
            self._cond.notify_all()
        _log().info("pool child %d replaced by %d", worker.slot.index, worker.pid)

    def _start_failed(
        self, slot: _Slot, error: StartupError, worker: _Worker | None = None
    ) -> None:
        with self._cond:
            if self.closed:
                return
            if worker is not None:
                self._starting.remove(worker)
            slot.worker = None
            delay = min(_FIRST_BACKOFF * 2**slot.failures, _MAX_BACKOFF)
            slot.failures += 1
            slot.due = time.monotonic() + delay
            if not self.closed:
                self._waiting.append(slot)
            self.failures += 1
            self.last_failure = error
            self._cond.notify_all()
        _log().warning(
            "pool child %d could not be replaced (%d failure(s) in a row): %s; "
            "trying again in %.1f s",
            slot.index,
            slot.failures,
            error,
            delay,
        )

    # -- chores -------------------------------------------------------------------

    def chores(self, look: float = 0.0) -> bool:
        """Launch the replacements that are due, read the hellos that came, close
        drained workers. With ``look``, wait up to that long for a hello if none came
        (the return value says whether it did)."""
        if not (self._waiting or self._starting or self._drained):
            return False
        now = time.monotonic()
        with self._cond:
            if self.closed:
                return False
            launch = [slot for slot in self._waiting if slot.due <= now]
            for slot in launch:
                self._waiting.remove(slot)
            drained, self._drained = self._drained, []
            starters = [worker for worker in self._starting if not worker.greeting]
        for worker in drained:
            worker.server.close(1.0)
        for slot in launch:
            self._launch(slot)
        answered = [w for w in starters if w.server._answered() or self._late(w, now)]
        looked = not answered and look > 0 and bool(starters)
        if looked and starters[0].server._answered(look):
            answered = starters[:1]
        for worker in answered:
            with self._cond:
                if worker.greeting or worker not in self._starting:
                    continue
                worker.greeting = True
            self._greet_later(worker)
        return looked

    @staticmethod
    def _late(worker: _Worker, now: float) -> bool:
        return worker.deadline is not None and now >= worker.deadline

    # -- dispatch -----------------------------------------------------------------

    def take(self, deadline: float | None, limit: int | None = None) -> tuple[_Worker, bool]:
        """A worker for one call, and whether the call had to wait for it.

        ``limit``: only a worker with fewer calls in flight (``map``), waiting for one.

        Raises:
            ClientClosedError: the pool is closed.
            CallTimeoutError: ``deadline`` passed with no worker to take.
            StartupError: no child runs, and a start failed while this call waited.
        """
        failures = self.failures
        waited = False
        while True:
            with self._cond:
                worker = self._pick(limit)
            if worker is not None:
                if not worker.server._ended():
                    return worker, waited
                self.give_back(worker, dead=True)  # it died idle: this call never went to it
                continue
            waited = True
            self._wait(deadline, limit, failures)

    def _pick(self, limit: int | None) -> _Worker | None:
        """The ready worker with the fewest calls in flight, now counted as given one more."""
        if self.closed:
            raise ClientClosedError("the pool was closed")
        ready = self._ready
        if not ready:
            return None
        # Ties go to the first: a caller alone keeps one child warm (both ends spin
        # between its calls), which is about twice as fast as going round them.
        best = ready[0]
        if best.in_flight:
            for worker in ready:
                if worker.in_flight < best.in_flight:
                    best = worker
                    if not worker.in_flight:
                        break
        if limit is not None and best.in_flight >= limit:
            return None
        best.in_flight += 1
        best.given += 1
        if self._max_calls is not None and best.given >= self._max_calls:
            self._retire(best)  # its last call: it takes no other
        return best

    def _wait(self, deadline: float | None, limit: int | None, failures: int) -> None:
        """No worker to take: do the chores, and wait a little for one."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise CallTimeoutError("no child of the pool was free before the call's timeout")
        look = _LOOK_AGAIN if left is None else min(left, _LOOK_AGAIN)
        with self._cond:
            if self.failures != failures and not self._ready and not self._starting:
                assert self.last_failure is not None
                error = fresh_error(self.last_failure)
                raise error
            hello_to_wait_for = bool(self._starting) and (limit is None or not self._ready)
        looked = self.chores(look if hello_to_wait_for else 0.0)
        with self._cond:
            if self._pick_possible(limit) or self.closed:
                return
            if not looked:
                self._cond.wait(look)  # for a call to end (map), a hello, or a start to be due

    def _pick_possible(self, limit: int | None) -> bool:
        if limit is None:
            return bool(self._ready)
        return any(worker.in_flight < limit for worker in self._ready)

    def give_back(
        self, worker: _Worker, error: BaseException | None = None, dead: bool = False
    ) -> None:
        """A call on ``worker`` ended (``error``: how it failed): count it, retire the
        worker if it is gone or over its memory, then do the chores."""
        if error is not None and not dead:
            dead = isinstance(error, ConnectionLostError | ProtocolError) or (
                isinstance(error, CallTimeoutError) and not worker.server.is_alive()
            )
        too_big = False
        if self._max_memory is not None and not dead and worker.state is _READY:
            rss = resident_bytes(worker.pid)
            too_big = rss is not None and rss > self._max_memory
        with self._cond:
            worker.in_flight -= 1
            if dead or too_big:
                self._retire(worker)
            elif not worker.in_flight and worker in self._retiring:
                self._retiring.discard(worker)
                self._drained.append(worker)
            self._cond.notify_all()
        self.chores()

    def _retire(self, worker: _Worker) -> None:
        """Under the lock: ``worker`` takes no more calls, and its slot starts another."""
        if worker.state is not _READY:
            return
        self._ready.remove(worker)
        worker.state = _RETIRING
        if worker.in_flight:
            self._retiring.add(worker)  # closed when its last call is given back
        else:
            self._drained.append(worker)
        slot = worker.slot
        if slot.worker is worker:
            slot.worker = None
            slot.due = 0.0
            self._waiting.append(slot)

    def claim(self, worker: _Worker) -> bool:
        """Count one call on this very worker (``broadcast``), if it is still ready."""
        with self._cond:
            if self.closed:
                raise ClientClosedError("the pool was closed")
            if worker.state is not _READY:
                return False
            worker.in_flight += 1
            worker.given += 1
            if self._max_calls is not None and worker.given >= self._max_calls:
                self._retire(worker)
            return True

    def notice_deaths(self) -> None:
        """Retire every ready worker whose child has ended (one poll each), then do the
        chores: a child that died idle is seen only when a call would go to it, else."""
        with self._cond:
            ready = list(self._ready)
        for worker in ready:
            if worker.server._ended():
                with self._cond:
                    self._retire(worker)
        self.chores()

    def ready_in_order(self) -> list[_Worker]:
        with self._cond:
            return [
                slot.worker
                for slot in self.slots
                if slot.worker is not None and slot.worker.state is _READY
            ]

    def pids(self) -> list[int]:
        with self._cond:
            return [slot.worker.pid for slot in self.slots if slot.worker is not None]

    # -- closing --------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Stop taking calls, then close every child at once (each close is bounded)."""
        with self._cond:
            self.closed = True
            workers = [slot.worker for slot in self.slots if slot.worker is not None]
            workers += [*self._retiring, *self._drained]
            for slot in self.slots:
                slot.worker = None
            self._ready.clear()
            self._starting.clear()
            self._waiting.clear()
            self._retiring.clear()
            self._drained.clear()
            self._cond.notify_all()
        _close_servers([worker.server for worker in workers], timeout)


def _close_servers(servers: list[Server[Any]], timeout: float) -> None:
    """Close ``servers`` in parallel: one thread each, every one bounded by ``Server.close``."""
    if len(servers) == 1:
        servers[0].close(timeout)
        return
    threads = [
        threading.Thread(target=server.close, args=(timeout,), name="pipe_rpc-pool-close")
        for server in servers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Pool(Generic[T]):
    """Many children serving the same service behind one typed proxy; made by ``pool()``.

    Each call through ``proxy`` goes to the child with the fewest calls in
    flight. A child that dies fails only the calls it had and is replaced;
    ``map`` spreads a one-argument method over an iterable, ``broadcast`` calls
    every child.
    """

    def __init__(self, workers: _Workers, timeout: float | None, max_concurrency: int) -> None:
        self._workers = workers
        self._timeout = timeout
        self._places = max_concurrency
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
        worker, waited = workers.take(deadline, limit)
        try:
            if waited and deadline is not None:  # the wait for a child counts against the call
                timeout = max(deadline - time.monotonic(), 1e-6)
            result = worker.server.invoke(method, args, kwargs, timeout)
        except BaseException as exc:
            workers.give_back(worker, exc)
            raise
        workers.give_back(worker)
        return result

    def map(
        self, method: Callable[[A], R], iterable: Iterable[A], *, ordered: bool = True
    ) -> Iterator[R]:
        """Call a one-argument ``method`` of ``proxy`` on each item, on all children at once.

        ``pool.map(pool.proxy.parse, paths)`` yields each result, in the order of
        ``iterable`` (``ordered=False``: as they come). Items are drawn lazily, a
        bounded window ahead; each child has at most ``max_concurrency`` of them
        in flight. A failed item raises its exception from the ``next()`` that
        would have returned its result, and the iterator goes on with the next
        items. Closing the iterator (``close()``, or dropping it) stops sending items.

        Raises:
            TypeError: ``method`` is not a method of this pool's proxy.
        """
        name, timeout = self._method_name(method, "map")
        return _MapResults(self, name, timeout, iter(iterable), ordered)

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
            if not workers.claim(worker):
                continue
            try:
                results.append(worker.server.invoke(name, args, kwargs, timeout))
            except BaseException as exc:
                workers.give_back(worker, exc)
                raise
            workers.give_back(worker)
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
        self._workers.notice_deaths()
        return self._workers.pids()

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


class _MapResults(Iterator[R]):
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

    def __iter__(self) -> _MapResults[R]:
        return self

    def __next__(self) -> R:
        if self._finished:
            raise StopIteration
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
    check_options(factory, start_method, on_timeout, "never", max_concurrency, limits)
    size = _default_size() if size is None else size
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
    timeout = check_timeout(timeout)
    start_timeout = check_timeout(start_timeout, "start_timeout")
    make = functools.partial(
        Server,
        factory,
        timeout=timeout,
        start_method=start_method,
        on_timeout=on_timeout,
        restart="never",
        max_concurrency=max_concurrency,
        limits=limits,
        untrusted=untrusted,
        allowed_types=tuple(allowed_types),
        max_reply_bytes=None,
        name=name,
        start_timeout=start_timeout,
        wait=False,
    )
    workers = _Workers(make, size, start_timeout, max_calls_per_child, max_memory_per_child)
    return Pool[T](workers, timeout, max_concurrency)
