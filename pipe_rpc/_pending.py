"""What a call waits on: its place in the pending table, and what wakes its owner.

A ``PendingCall`` holds a call's outcome once it is settled; settling wakes the
call's *waiter*, a small protocol with one method, ``wake()``: a thread's lock
(``ThreadWaiter``), an event loop's future (``_aio``), a
``concurrent.futures.Future`` (``_futures``) or a stream's item queue
(``_stream``). Settling twice is harmless, and a waiter set after the call was
settled sees ``done`` first, so no wake-up is ever needed twice or lost for good.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class Waiter(Protocol):
    """What a call wakes when it is settled: a thread's lock, an event loop's future, ...

    ``leads``: the waiter is a thread that can take over reading the pipe when it
    is woken (an event loop reads through its own callback instead).
    """

    leads: bool

    def wake(self) -> None: ...


class ThreadWaiter:
    """A waiter for one thread: a lock that stays held until something wakes it."""

    __slots__ = ("_lock",)
    leads = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already woken and not yet asleep again
            pass

    def sleep(self, timeout: float) -> None:
        self._lock.acquire(True, timeout)


class Both:
    """Two waiters woken together: a call's own (a future's) and a thread waiting for it."""

    __slots__ = ("first", "second")
    leads = True

    def __init__(self, first: Waiter, second: ThreadWaiter) -> None:
        self.first = first
        self.second = second

    def wake(self) -> None:
        self.first.wake()
        self.second.wake()


class PendingCall:
    """One call's place in the pending table, and its outcome once settled."""

    __slots__ = ("done", "method", "ok", "value", "waiter")

    def __init__(self, method: str = "") -> None:
        self.method = method
        self.done = False
        self.ok = False
        self.value: Any = None
        self.waiter: Waiter | None = None  # set by an owner about to sleep

    def settle(self, ok: bool, value: Any) -> None:
        if not self.done:
            self.ok = ok
            self.value = value
            self.done = True
        waiter = self.waiter  # read after done: an owner that set it after sees done
        if waiter is not None:
            waiter.wake()

    def settled(self) -> bool:
        """``done``, read afresh (where a type checker has narrowed the attribute)."""
        return self.done

    def outcome(self) -> Any:
        """The value, or raise the error (only once ``done``)."""
        if self.ok:
            return self.value
        raise self.value


class Waiters(threading.local):
    """Each calling thread's waiter, made the first time it sleeps."""

    def __init__(self) -> None:
        self.waiter = ThreadWaiter()
