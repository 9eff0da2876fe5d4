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
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from ._connection import Connection
from ._errors import CallTimeoutError
from ._pending import PendingCall
from ._stats import MethodCounts
from ._transport import WriteTimeout

#: How long a connection's ``submit`` thread waits for the next call before it ends.
_LINGER = 0.25
#: How long it leaves a call to a ``result()`` that has been reading replies itself.
_GRACE = 0.002

#: A future's states (``concurrent.futures``' own strings).
_FINISHED, _CANCELLED, _NOTIFIED = "FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"
_OVER = frozenset({_FINISHED, _CANCELLED, _NOTIFIED})
_CANCELLED_STATES = frozenset({_CANCELLED, _NOTIFIED})

#: Where ``CallFuture._tell`` has got to: notify, count, then the hooks from ``_HOOKS`` on.
_NOTIFY, _LATENCY, _KIND, _ENDED, _HOOKS = range(5)


class Again(functools.partial[Any]):
    """A done callback that is called once more if an interrupt ends it: one that does
    nothing the second time (a pool's give-back). Any other is called once."""


class CallFuture(Future[Any]):
    """The future of a submitted call; ``cancel()`` acts as the call's timeout.

    ``result()`` waits for the reply in the calling thread, as a sync call does (it
    leads the reading or follows whoever does), rather than for the connection's
    thread to hand the outcome over: that hand-over costs more than the call.

    A signal can land in whichever thread completes it, ``result()``'s among them.
    ``concurrent.futures.Future`` enters its condition in Python (an interrupt between
    the lock's acquire and the ``with`` keeps it held) and runs no callback after an
    interrupted one; so this completes itself (``_complete``): under the bare lock,
    then ``_tell`` runs what the completion owes, each part once, from where an
    interrupt stopped it, before the interrupt goes on up. The state is read without
    the lock where one read is the answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_cancel: list[Callable[[], object]] = []  # run when the call is cancelled
        #: ``wait(deadline)``: wait in this thread until the call is settled or ``deadline``.
        self.wait: Callable[[float | None], None] | None = None
        #: The server's counts of the call's method, and when it started; the outcome
        #: is counted as the future completes.
        self.counts: MethodCounts | None = None
        self.started = 0
        self._told = _NOTIFY

    def result(self, timeout: float | None = None) -> Any:
        wait = self.wait
        if wait is not None and self._state != _FINISHED:
            end = None if timeout is None else time.monotonic() + timeout
            wait(end)
            if end is not None:
                timeout = max(0.0, end - time.monotonic())
        if self._state != _FINISHED:
            if self._state in _CANCELLED_STATES:
                raise CancelledError
            return super().result(timeout)  # being completed by another thread, or no time
        try:
            if self._exception is None:
                return self._result
            raise self._exception
        finally:
            del self  # no cycle through the raised exception's frames

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        if self._state in _CANCELLED_STATES:
            raise CancelledError
        return super().exception(timeout)

    def done(self) -> bool:
        return self._state in _OVER

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def set_result(self, result: Any) -> None:
        if not self._complete(_FINISHED, result, None):
            raise InvalidStateError(f"{self._state}: {self!r}")

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._complete(_FINISHED, None, exception):
            raise InvalidStateError(f"{self._state}: {self!r}")

    def cancel(self) -> bool:
        """Settle the call as timed out, at once: abandon it (and kill its child if that
        is the policy). False once it has its outcome."""
        return self._complete(_CANCELLED, None, None) or self._state in _CANCELLED_STATES

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with self._condition._lock:  # type: ignore[attr-defined]  # entered in C: see above
            if self._state not in _OVER:
                self._done_callbacks.append(fn)  # type: ignore[attr-defined]
                return
        try:
            fn(self)
        except Exception:
            _LOG.exception("exception calling callback for %r", self)

    def _complete(self, state: str, result: Any, exception: BaseException | None) -> bool:
        """Move to ``state`` (``FINISHED`` with ``result`` or ``exception``, or
        ``CANCELLED``) and tell everyone; False if the future was done already.

        Whoever moves it tells: an interrupt anywhere after the move is caught here,
        and ``_tell`` goes on from where it stopped before the interrupt is raised.
        """
        moved = False
        try:
            with self._condition._lock:  # type: ignore[attr-defined]
                if self._state in _OVER:
                    return False
                self._result = result
                self._exception = exception
                self._state = state
                moved = True  # no call since the check: every landing after is in the try
            self._tell()
        except BaseException:
            if moved:
                self._tell()  # from where the interrupt stopped it (nothing, if it got through)
            raise
        return True

    def _tell(self) -> None:
        """What a completion owes, from ``_told`` on: wake the threads waiting, count the
        outcome, run the cancel hooks and the done callbacks.

        ``_told`` moves past a part before it runs when a second run would be wrong
        (a count: one C call, which an interrupt can only follow; a callback), after it
        when a second run is harmless (waking, a cancel hook, an ``Again``). An
        interrupt in a callback is raised once the rest have run.
        """
        interrupt: BaseException | None = None
        stuck = -1
        while True:
            try:
                self._tell_from()
                break
            except BaseException as exc:
                if interrupt is None:
                    interrupt = exc
                if self._told == stuck:  # a part that raises each time runs twice at most
                    self._told += 1
                stuck = self._told
        if interrupt is not None:
            raise interrupt

    def _tell_from(self) -> None:
        told = self._told
        if told == _NOTIFY:
            self._notify_waiters()
            self._told = told = _LATENCY
        if self.counts is not None and told < _HOOKS:
            told = self._count_end(self.counts, told)
        self._told = told = max(told, _HOOKS)
        hooks: list[Any] = self.on_cancel if self._state != _FINISHED else []
        callbacks: list[Any] = self._done_callbacks  # type: ignore[attr-defined]
        while True:
            at = told - _HOOKS
            if at < len(hooks):
                hooks[at]()
                self._told = told = told + 1
                continue
            at -= len(hooks)
            if at >= len(callbacks):
                return
            callback = callbacks[at]
            again = isinstance(callback, Again)
            if not again:
                self._told = told + 1
            try:
                callback(self)
            except Exception:
                _LOG.exception("exception calling callback for %r", self)
            self._told = told = told + 1

    def _notify_waiters(self) -> None:
        """Tell ``concurrent.futures.wait()`` and ``as_completed`` (their waiters) and the
        threads in ``result()`` that the future is done."""
        condition = self._condition
        with condition._lock:  # type: ignore[attr-defined]
            if self._state == _FINISHED:
                for waiter in self._waiters:  # ``concurrent.futures.wait()``'s
                    if self._exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
            elif self._state in _CANCELLED_STATES:  # again, if an interrupt cut it
                # What an executor's ``set_running_or_notify_cancel`` does for its
                # futures: no executor runs this one, and ``wait()`` and
                # ``as_completed`` count a cancelled future as done only once notified.
                self._state = _NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
            if condition._waiters:  # type: ignore[attr-defined]  # threads in ``wait()``
                condition.notify_all()

    def _count_end(self, counts: MethodCounts, told: int) -> int:
        """Count the call's end, each step once (``told`` says which are done); the
        steps done by the end."""
        if told == _LATENCY:
            self._told = told = _KIND
            counts.latencies.append(time.perf_counter_ns() - self.started)
        if told == _KIND:
            kind = None
            if self._state != _FINISHED or isinstance(self._exception, CallTimeoutError):
                kind = counts.timeouts
            elif self._exception is not None:
                kind = counts.errors
            self._told = told = _ENDED
            if kind is not None:
                next(kind)
        if told == _ENDED:
            self._told = told = _HOOKS
            next(counts.ended)
        return told


_LOG = logging.getLogger("concurrent.futures")  # where ``Future`` logs a failed callback


class _FutureWaiter:
    """Completes a ``CallFuture`` with its call's outcome."""

    __slots__ = ("future", "pending")
    leads = False

    def __init__(self, future: CallFuture, pending: PendingCall) -> None:
        self.future = future
        self.pending = pending

    def wake(self) -> None:
        if self.pending.done:
            _complete_from(self.future, self.pending)


def _complete_from(future: CallFuture, pending: PendingCall) -> None:
    """Complete ``future`` with settled ``pending``'s outcome (nothing if it is done)."""
    if pending.ok:
        future._complete(_FINISHED, pending.value, None)
    else:
        future._complete(_FINISHED, None, pending.value)


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
        start = False
        try:
            with self.lock:
                self.queue.append(item)
                if not self.running:
                    self.running = start = True  # no call between: started in the finally
                if self.dozing or not self.waited:
                    self.more.notify()
        finally:
            if start:  # an interrupt must not leave it ``running`` with no thread
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
                future._complete(_FINISHED, None, exc)
            finally:
                if pending.done:
                    # A reader an interrupt stopped as it settled the call may have left the
                    # future to complete, and the call in the table (its frame is read
                    # again later, as a late reply).
                    if future._state not in _OVER:
                        _complete_from(future, pending)
                    if call_id in self.core.protocol.pending:
                        self.core.abandon(call_id)
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
    future._complete(_FINISHED, None, error)  # nothing if cancelled meanwhile


_PUMPS_LOCK = threading.Lock()


def submit_call(
    core: Connection,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
) -> CallFuture:
    """Register and write one call; its outcome completes the returned future.

    Everything after the future is made is inside one ``try``: wherever an interrupt
    (or a failure) lands, the call is abandoned and settled with it (the future
    completed and counted, and a pump handed it already done with it).
    """
    core.check_usable()
    future = CallFuture()
    pending = PendingCall(method)
    pending.waiter = waiter = _FutureWaiter(future, pending)
    call_id = 0
    try:
        counters = core.counters
        if counters is not None:
            future.started = time.perf_counter_ns()
            future.counts = counts = counters.of(method)
            next(counts.started)  # no call since ``counts`` was stored: ended as it completes
        deadline = None if timeout is None else time.monotonic() + timeout
        call_id, frame = core.protocol.start(method, args, kwargs, pending)
        core._send(frame, deadline)
        if pending.done:  # settled already (the connection broke as it was sent)
            waiter.wake()
            return future
        future.on_cancel.append(functools.partial(core.abandon, call_id))
        pump = core.pump
        if pump is None:
            pump = _pump_of(core)
        future.wait = functools.partial(_wait_for, pump, pending, deadline)
        pump.add((pending, call_id, deadline, future))
    except BaseException as exc:
        error = exc
        if isinstance(exc, WriteTimeout):
            error = CallTimeoutError(f"{method}() timed out after {timeout} s waiting to send")
        if call_id:
            core.abandon(call_id)
        pending.settle(False, error)  # completes the future; a pump handed it stops waiting
        if error is not exc:
            raise error from None
        raise
    return future


def _pump_of(core: Connection) -> _Pump:
    with _PUMPS_LOCK:
        pump: _Pump | None = core.pump
        if pump is None:
            pump = core.pump = _Pump(core)
        return pump
