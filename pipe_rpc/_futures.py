"""``submit``'s core: a call whose outcome completes a ``concurrent.futures.Future``.

``submit_call`` registers a call whose waiter completes a ``CallFuture`` and
returns once the request is written. Whoever calls ``result()`` reads the reply
in its own thread, as a sync caller does; one bare thread per connection (the
*pump*) waits, like any sync caller, for the calls nobody waits for, oldest
first, and exits when none is left. (A module of its own, under the client and
the server layers, so that they import it once and not per call.)
"""

from __future__ import annotations

import _thread
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ._connection import Connection
from ._errors import CallTimeoutError
from ._pending import PendingCall
from ._stats import ERROR, OK, TIMEOUT, MethodCounts
from ._transport import WriteTimeout

#: How long a connection's ``submit`` thread waits for the next call before it ends.
_LINGER = 0.25
#: How long it leaves a call to a ``result()`` that has been reading replies itself.
_GRACE = 0.002

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
            self.counts.finish(self.started, OK)

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        if self.counts is not None:
            timed_out = isinstance(exception, CallTimeoutError)
            self.counts.finish(self.started, TIMEOUT if timed_out else ERROR)

    def cancel(self) -> bool:
        if not super().cancel():  # answered already
            return False
        with _CANCELS:  # ``Future.cancel`` is true again once cancelled: act on the first
            if self.cancel_seen:
                return True
            self.cancel_seen = True
        if self.counts is not None:
            self.counts.finish(self.started, TIMEOUT)
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
