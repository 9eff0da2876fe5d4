"""The pool's children: starting them, replacing one that died, closing them all.

A pool starts every child at once and reads the hellos after (``start_all``). A
child that dies or is retired leaves its *slot* to be started again; the
replacement is launched outside the lock by ``chores()``, which a call runs
before it picks a child, and its hello is read once it has answered, so no call
waits for a start. A replacement that fails is tried again after a backoff that
doubles from ``_FIRST_BACKOFF`` up to ``_MAX_BACKOFF``, and each failure is
logged. Which child takes a call is ``_pool_workers``'s. Everything here is
guarded by one lock, ``_lock`` (waited on through ``_cond``), never held while
a process is started, greeted or closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ._errors import StartupError
from ._process import Server
from ._stats import Counters

if TYPE_CHECKING:
    import logging

#: The first delay before a failed start is tried again; it doubles up to ``_MAX_BACKOFF``.
_FIRST_BACKOFF = 0.1

_MAX_BACKOFF = 10.0

_STARTING, _READY, _RETIRING = "starting", "ready", "retiring"


def _log() -> logging.Logger:
    """The ``"pipe_rpc"`` logger (``logging`` is imported on first use: a child never needs it)."""
    import logging

    logger = logging.getLogger("pipe_rpc")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return logger


class _Worker:
    """One child of the pool and its counters (guarded by the pool's lock)."""

    __slots__ = (
        "absorbed",
        "deadline",
        "given",
        "greeting",
        "in_flight",
        "pid",
        "server",
        "slot",
        "state",
    )

    def __init__(self, server: Server[Any], slot: _Slot, start_timeout: float | None) -> None:
        self.server = server
        self.slot = slot
        self.pid = cast(int, server.pid)
        self.state = _STARTING
        self.in_flight = 0
        self.given = 0  # calls given to it, counted when they are
        self.greeting = False  # a thread is reading its hello
        self.absorbed = False  # its counts are in ``Children.retired``
        self.deadline = None if start_timeout is None else time.monotonic() + start_timeout


class _Slot:
    """A place in the pool: its worker, or when to start one again."""

    __slots__ = ("due", "failures", "index", "launching", "worker")

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: _Worker | None = None
        self.failures = 0  # starts that failed in a row
        self.due = 0.0  # when to launch, while it has no worker
        self.launching = False  # out of ``_waiting``, its process being started


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


class Children:
    """A pool's slots and the children in them: start, replace, chores, close."""

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
                slot.launching = False
                self._starting.append(worker)
                self._cond.notify_all()
                return
            slot.launching = False
        server.close(1.0)

    def _launch_later(self, launch: list[_Slot]) -> None:
        """The slots of ``launch`` an exception kept from launching wait again."""
        with self._lock:
            for slot in launch:
                if slot.launching:
                    slot.launching = False
                    if not self.closed and slot.worker is None and slot not in self._waiting:
                        self._waiting.append(slot)
            self._cond.notify_all()

    def wait_launches(self, timeout: float) -> None:
        """Under the lock: wait (up to ``timeout``) while another thread starts a slot's
        process, so a replacement being launched is counted as starting."""
        deadline = time.monotonic() + timeout
        while any(slot.launching for slot in self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

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
            slot.launching = False
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

    def chores(self, look: float = 0.0) -> bool:
        """Launch the replacements that are due, read the hellos that came, close
        drained workers. With ``look``, wait up to that long for a hello if none came
        (the return value says whether it did)."""
        if not (self._waiting or self._starting or self._drained):
            return False
        now = time.monotonic()
        launch: list[_Slot] = []
        try:  # from before a slot is marked to its launch: any left go back to waiting
            with self._lock:
                if self.closed:
                    return False
                launch = [slot for slot in self._waiting if slot.due <= now]
                for slot in launch:
                    slot.launching = True  # marked before it leaves ``_waiting``
                self._waiting = [slot for slot in self._waiting if not slot.launching]
                starters = [worker for worker in self._starting if not worker.greeting]
            while launch:
                self._launch(launch[0])
                del launch[0]
        finally:
            if launch:
                self._launch_later(launch)
        drained: list[_Worker] = []
        try:  # from their taking to their close: any not closed go back, to be closed next
            with self._lock:  # taken after the launches, which an exception may end
                drained, self._drained = self._drained, []
            while drained:
                worker = drained[0]
                with self._lock:  # counted first: while it closes, stats() no longer sees it
                    if not worker.absorbed:
                        retired = self.retired.merged(worker.server._counters)
                        # Both stores or neither: no signal handler runs between them.
                        self.retired = retired
                        worker.absorbed = True
                worker.server.close(1.0)
                del drained[0]
        finally:
            if drained:
                self._put_back(drained)
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

    def _put_back(self, drained: list[_Worker]) -> None:
        """Drained workers an interrupt kept the chores from closing: the next chores
        close them, or, if the pool was closed meanwhile (its ``close`` did not see
        them), they are closed here."""
        with self._lock:
            closed = self.closed
            if not closed:
                self._drained += drained
        if closed:
            close_servers([worker.server for worker in drained], 1.0)

    @staticmethod
    def _late(worker: _Worker, now: float) -> bool:
        return worker.deadline is not None and now >= worker.deadline

    def counters(self) -> list[Counters]:
        """The counts of every child the pool has had, for ``Pool.stats()``: the closed
        ones' (``retired``), and each live child's or retired child's not closed yet."""
        with self._lock:
            live = [slot.worker for slot in self.slots if slot.worker is not None]
            # Retired but not yet closed: their counts are not in ``retired`` yet (unless
            # an interrupt sent one back to be closed again).
            live += [w for w in (*self._retiring, *self._drained) if not w.absorbed]
        return [self.retired, *(worker.server._counters for worker in live)]

    def close(self, timeout: float) -> None:
        """Stop taking calls, then close every child at once (each close is bounded)."""
        with self._lock:
            self.closed = True
            workers = [slot.worker for slot in self.slots if slot.worker is not None]
            workers += [*self._retiring, *self._drained]
            for slot in self.slots:
                slot.worker = None
                slot.launching = False
            self._ready.clear()
            self._starting.clear()
            self._waiting.clear()
            self._retiring.clear()
            self._drained.clear()
            self._cond.notify_all()
        close_servers([worker.server for worker in workers], timeout)
