"""The children of a pool: dispatch, chores, replacement and close (see ``_pool``).

Everything here is guarded by one lock, ``Workers._lock`` (waited on through
``Workers._cond``), that is never held while a process is started, greeted or closed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    ProtocolError,
    StartupError,
)
from ._process import Server
from ._proxy import fresh_error
from ._stats import Counters

if TYPE_CHECKING:
    import logging
    from concurrent.futures import Future

#: The first delay before a failed start is tried again; it doubles up to ``_MAX_BACKOFF``.
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
#: The longest a call waiting for a child sleeps before it looks again.
_LOOK_AGAIN = 0.05

_STARTING, _READY, _RETIRING = "starting", "ready", "retiring"


def _log() -> logging.Logger:
    """The ``"pipe_rpc"`` logger (``logging`` is imported on first use: a child never needs it)."""
    import logging

    logger = logging.getLogger("pipe_rpc")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return logger


def default_size() -> int:
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


class Lease:
    """One call's hold on a worker: what to give back, and only once.

    A caller makes one before its ``try`` and takes into it inside: ``take`` records
    the worker with no Python call between its count going up and the record, and
    ``give_back`` clears it with none between the record and the count going down,
    both under the lock. So an exception a signal handler raises, wherever it lands,
    leaves the worker either not taken or recorded here for the ``except`` to give
    back; and giving back a lease already given back does nothing, so a done callback
    and an ``except`` may both try.
    """

    __slots__ = ("worker",)

    def __init__(self) -> None:
        self.worker: _Worker | None = None


class Workers:
    """The pool's children: dispatch, chores, replacement, close (see ``_pool``)."""

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
        # Entered as the bare lock (``with self._lock``), whose ``__enter__`` is C: a
        # ``Condition``'s is Python, and an interrupt landing in it after the acquire
        # would leave the lock held for ever.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.slots = [_Slot(index) for index in range(size)]
        #: The counts of the children the pool has closed, for ``Pool.stats()``.
        self.retired = Counters()
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
        with self._lock:
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
            with self._lock:
                worker.greeting = False
            raise
        with self._lock:
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
        with self._lock:
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
        with self._lock:
            if self.closed:
                return False
            launch = [slot for slot in self._waiting if slot.due <= now]
            for slot in launch:
                self._waiting.remove(slot)
            drained, self._drained = self._drained, []
            starters = [worker for worker in self._starting if not worker.greeting]
        for worker in drained:
            worker.server.close(1.0)
            self.retired.absorb(worker.server._counters)
        for slot in launch:
            self._launch(slot)
        answered = [w for w in starters if w.server._answered() or self._late(w, now)]
        looked = not answered and look > 0 and bool(starters)
        if looked and starters[0].server._answered(look):
            answered = starters[:1]
        for worker in answered:
            with self._lock:
                if worker.greeting or worker not in self._starting:
                    continue
                worker.greeting = True
            self._greet_later(worker)
        return looked

    @staticmethod
    def _late(worker: _Worker, now: float) -> bool:
        return worker.deadline is not None and now >= worker.deadline

    # -- dispatch -----------------------------------------------------------------

    def take(
        self, lease: Lease, deadline: float | None, limit: int | None = None
    ) -> tuple[_Worker, bool]:
        """A worker for one call, recorded in ``lease``, and whether the call had to wait.

        ``limit``: only a worker with fewer calls in flight (``map``), waiting for one.

        Raises:
            ClientClosedError: the pool is closed.
            CallTimeoutError: ``deadline`` passed with no worker to take.
            StartupError: no child runs, and a start failed while this call waited.
        """
        failures = self.failures
        waited = False
        while True:
            with self._lock:
                worker = self._pick(lease, limit)
            if worker is not None:
                if not worker.server._ended():
                    return worker, waited
                self.give_back(lease, dead=True)  # it died idle: this call never went to it
                continue
            waited = True
            self._wait(deadline, limit, failures)

    def take_now(self, lease: Lease, limit: int | None = None) -> _Worker | None:
        """``take`` without waiting: ``None`` if no worker is ready (or alive) now."""
        with self._lock:
            worker = self._pick(lease, limit)
        if worker is not None and worker.server._ended():
            self.give_back(lease, dead=True)
            return None
        return worker

    def any_ready(self, deadline: float | None) -> _Worker:
        """A ready worker to ask about the service (nothing is counted), waiting for one."""
        failures = self.failures
        while True:
            with self._lock:
                if self.closed:
                    raise ClientClosedError("the pool was closed")
                if self._ready:
                    return self._ready[0]
            self._wait(deadline, None, failures)

    def _pick(self, lease: Lease, limit: int | None) -> _Worker | None:
        """The ready worker with the fewest calls in flight, now counted as given one more
        and recorded in ``lease``."""
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
        lease.worker = best  # no call between: an interrupt finds it counted and recorded
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
        with self._lock:
            if self.failures != failures and not self._ready and not self._starting:
                assert self.last_failure is not None
                error = fresh_error(self.last_failure)
                raise error
            hello_to_wait_for = bool(self._starting) and (limit is None or not self._ready)
        looked = self.chores(look if hello_to_wait_for else 0.0)
        with self._lock:
            if self._pick_possible(limit) or self.closed:
                return
            if not looked:
                self._cond.wait(look)  # for a call to end (map), a hello, or a start to be due

    def _pick_possible(self, limit: int | None) -> bool:
        if limit is None:
            return bool(self._ready)
        return any(worker.in_flight < limit for worker in self._ready)

    def give_back(
        self, lease: Lease, error: BaseException | None = None, dead: bool = False
    ) -> None:
        """The call holding ``lease`` ended (``error``: how it failed): count it, retire
        its worker if it is gone or over its memory, then do the chores. Nothing if the
        lease holds no worker (never taken, or given back already)."""
        worker = lease.worker
        if worker is None:
            return
        if error is not None and not dead:
            # A timeout, or a cancelled task or future, may have killed it (on_timeout="kill").
            dead = isinstance(error, ConnectionLostError | ProtocolError) or (
                (isinstance(error, CallTimeoutError) or not isinstance(error, Exception))
                and worker.server._ended()
            )
        too_big = False
        if self._max_memory is not None and not dead and worker.state is _READY:
            rss = resident_bytes(worker.pid)
            too_big = rss is not None and rss > self._max_memory
        with self._lock:
            if lease.worker is not worker:  # another thread gave it back meanwhile
                return
            lease.worker = None
            worker.in_flight -= 1  # no call between: an interrupt finds both done or neither
            if dead or too_big:
                self._retire(worker)
            elif not worker.in_flight and worker in self._retiring:
                self._retiring.discard(worker)
                self._drained.append(worker)
            self._cond.notify_all()
        self.chores()

    def future_done(self, lease: Lease, future: Future[Any]) -> None:
        """``give_back`` for a submitted call, as its future completes (a done callback).

        It runs in whichever thread completes the future, maybe one a signal lands in:
        an interrupt anywhere in here still gives the lease back (a second try does
        nothing if the first got through)."""
        error: BaseException | None = None
        try:
            if future.cancelled():
                error = CallTimeoutError("the call was cancelled")
            else:
                error = future.exception()
        finally:
            try:
                self.give_back(lease, error)
            except BaseException:
                self.give_back(lease, error)
                raise

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

    def claim(self, worker: _Worker, lease: Lease) -> bool:
        """Count one call on this very worker (``broadcast``), if it is still ready, and
        record it in ``lease`` (as ``take`` does)."""
        with self._lock:
            if self.closed:
                raise ClientClosedError("the pool was closed")
            if worker.state is not _READY:
                return False
            worker.in_flight += 1
            lease.worker = worker  # no call between (see ``Lease``)
            worker.given += 1
            if self._max_calls is not None and worker.given >= self._max_calls:
                self._retire(worker)
            return True

    def notice_deaths(self) -> None:
        """Retire every ready worker whose child has ended (one poll each), then do the
        chores: a child that died idle is seen only when a call would go to it, else."""
        with self._lock:
            ready = list(self._ready)
        for worker in ready:
            if worker.server._ended():
                with self._lock:
                    self._retire(worker)
        self.chores()

    def ready_in_order(self) -> list[_Worker]:
        with self._lock:
            return [
                slot.worker
                for slot in self.slots
                if slot.worker is not None and slot.worker.state is _READY
            ]

    def pids(self) -> list[int]:
        with self._lock:
            return [slot.worker.pid for slot in self.slots if slot.worker is not None]

    # -- closing --------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Stop taking calls, then close every child at once (each close is bounded)."""
        with self._lock:
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
        close_servers([worker.server for worker in workers], timeout)


def close_servers(servers: list[Server[Any]], timeout: float) -> None:
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
