"""Liveness and fork hygiene: who is alive, who owns what, what a fork leaves behind.

- ``PeerMonitor``: one thread per connection that sleeps until the peer process
  ends, then says so (``ended``) and calls back. Blocking waits that do not
  watch the peer themselves (a side channel's doorbell) rely on it.
- ``wait_readable`` and ``wait_exitcode``: the one way to wait on a sentinel or
  a pidfd with a deadline.
- Fork hygiene: every descriptor a client holds is registered here, so that a
  child started by ``fork`` closes the parent's copies, and every object that
  belongs to a process can tell whether the current process is still that one
  (``fork_generation``).
"""

from __future__ import annotations

import _thread
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, cast

from ._errors import PipeRPCError


class HasSentinel(Protocol):
    """A process handle: anything with a ``sentinel`` descriptor (``multiprocessing.Process``)."""

    @property
    def sentinel(self) -> int: ...


class Closable(Protocol):
    """Something that holds descriptors of this process and can drop them quietly."""

    def close_inherited(self) -> None: ...


# -- fork generation ------------------------------------------------------------

#: How many times this process's lineage has forked; a forked child sees one more
#: than its parent. An object made in one generation belongs to that process alone.
_generation = [0]
#: The same, for a hot path: ``GENERATION[0]`` is ``fork_generation()`` without a call.
GENERATION = _generation


def fork_generation() -> int:
    """The current process's fork generation (compare with the one an object was made in)."""
    return _generation[0]


def check_owner(generation: int, what: str) -> None:
    """Raise ``PipeRPCError`` unless the current process is the one ``what`` was made in."""
    if generation != _generation[0]:
        raise PipeRPCError(
            f"this {what} belongs to the process that made it; it cannot be used after "
            f"os.fork() (this is process {os.getpid()}): make a new one here"
        )


#: Objects holding descriptors of this process; a forked child drops their copies.
_HOLDERS: weakref.WeakSet[Any] = weakref.WeakSet()


def register_holder(holder: Closable) -> None:
    """Have ``holder.close_inherited()`` run in every child this process forks."""
    _HOLDERS.add(holder)


def _after_fork_in_child() -> None:
    _generation[0] += 1
    for holder in list(_HOLDERS):
        try:
            holder.close_inherited()
        except Exception:  # a forked child must never fail for its parent's objects
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def close_inherited_now() -> None:
    """In a server child just forked: drop every holder's descriptors again.

    The fork hook already ran; this catches holders registered by another thread
    of the parent while it forked."""
    for holder in list(_HOLDERS):
        try:
            holder.close_inherited()
        except Exception:
            pass


# -- waiting on sentinels -------------------------------------------------------


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (``None``: for ever) for ``fd`` to be readable.

    A closed or invalid descriptor counts as readable: whatever it watched is over.
    """
    poll = select.poll()
    try:
        poll.register(fd, select.POLLIN)
    except (OSError, ValueError):
        return True
    return bool(poll.poll(None if timeout is None else timeout * 1000))


def wait_exitcode(process: HasSentinel, grace: float) -> int | None:
    """The process's exit code, waiting up to ``grace`` seconds for it to end.

    ``None``: still running. Never raises: a process object closed by another
    thread (a restart) answers with what it last knew.
    """
    try:
        wait_readable(process.sentinel, grace)
    except (OSError, ValueError):
        pass
    join = getattr(process, "join", None)
    deadline = time.monotonic() + grace
    while True:
        if join is not None:
            try:
                join(0.05)
            except (AssertionError, ValueError, OSError):
                pass
        try:
            exitcode = getattr(process, "exitcode", None)
        except (ValueError, OSError):
            exitcode = None
        if exitcode is not None or time.monotonic() >= deadline:
            return cast("int | None", exitcode)
        if join is None:
            time.sleep(0.01)  # a handle without join: its exit code comes with time


# -- the peer monitor -------------------------------------------------------------


class PeerMonitor:
    """A thread that sleeps until the peer process ends, then says so and calls back.

    ``ended`` lets a caller see a death without a system call of its own;
    ``on_end`` runs once in the monitor's thread when the process ends (not
    when the monitor is stopped). ``stop()`` ends the thread; it is idempotent.
    The monitor polls its own duplicate of the sentinel, so whoever owns the
    original may close it at any time.
    """

    def __init__(self, sentinel: int, on_end: Callable[[], None]) -> None:
        self.ended = False
        self._on_end = on_end
        watched = os.dup(sentinel)
        wake, self._stop = os.pipe()
        self._stop_lock = threading.Lock()
        # A bare thread: threading.Thread.start() waits for the thread to run, and
        # a bare thread is not counted when a later fork start method checks for threads.
        _thread.start_new_thread(self._run, (watched, wake))
        register_holder(self)

    def _run(self, watched: int, wake: int) -> None:
        poll = select.poll()
        poll.register(watched, select.POLLIN)
        poll.register(wake, select.POLLIN)
        try:
            events = dict(poll.poll())
            if wake not in events:
                self.ended = True
                self._on_end()
        finally:
            os.close(wake)
            os.close(watched)

    def stop(self) -> None:
        with self._stop_lock:
            stop, self._stop = self._stop, -1
        if stop >= 0:
            os.close(stop)

    def close_inherited(self) -> None:
        # In a forked child the thread does not exist; closing our end of the pipe
        # there keeps the parent's stop() able to end the parent's thread.
        self._stop_lock = threading.Lock()
        self.stop()
