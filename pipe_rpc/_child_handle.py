"""One child seen from the parent: its process, its stop and its death, and every
child stopped together at exit.

Theory of operation. A ``Child`` is one child process (a ``GuardedProcess``,
whose exit status several threads may ask for), the ``Client`` talking to it
and its standard error. It is stopped in steps, each only if the last did not
end it: asked (its client closed), SIGTERM after a grace, SIGKILL after
``KILL_GRACE``, always to its whole process group. A death is logged once,
with the last line of its standard error, and counted by its reason; the
error a call got from it carries the tail of that standard error.

A ``ServerHandle`` holds a server's current child, apart from the ``Server``,
so that a finalizer and the exit hook can stop it: at exit every live child is
stopped together, in about one grace in all (``stop_together``).

Logger ``"pipe_rpc"`` (``log()``): INFO when a child starts, is restarted or
closed, WARNING when one is seen dead or is killed for a timeout; nothing per call.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, cast

from ._client import Client
from ._errors import WorkerDiedError, describe_exitcode
from ._liveness import fork_generation, register_holder, wait_readable
from ._stats import Counters
from ._stderr import ChildStderr

if TYPE_CHECKING:
    import logging

    from ._limits import Limits

#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 0.25
#: ``max_reply_bytes`` when ``untrusted=True`` and none is given.


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the child's process group, or to the child alone if it has none yet."""
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class GuardedProcess:
    """A process handle whose exit status may be asked for from several threads.

    ``Popen.poll`` under ``forkserver`` reads the exit status from the sentinel
    once; a second thread reading at the same time finds end of file and
    records 255. One lock around ``exitcode``, ``join`` and ``close`` prevents it.
    Once closed it answers with what it last knew, never with ``ValueError``:
    a thread of an old client may still ask after a restart closed it.

    Where the platform has them, ``sentinel`` is a pidfd, readable once the
    process has ended. ``multiprocessing``'s own sentinel is a pipe that the
    child's forked children inherit: while one of them lives, it never fires.
    """

    def __init__(self, process: BaseProcess) -> None:
        self._process = process
        self._lock = threading.Lock()
        self._closed = False
        self._exitcode: int | None = None
        self.pid = process.pid
        try:
            self._pidfd: int | None = os.pidfd_open(process.pid)  # type: ignore[arg-type]
        except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
            self._pidfd = None
        self._sentinel = process.sentinel if self._pidfd is None else self._pidfd
        register_holder(self)

    def close_inherited(self) -> None:
        """In a forked child: this process is not the child's parent, so multiprocessing
        must not try to join it at exit."""
        self._lock = threading.Lock()
        self._closed = True
        children = getattr(multiprocessing.process, "_children", None)
        if children is not None:
            children.discard(self._process)

    @property
    def sentinel(self) -> int:
        """Readable once the process has ended (-1 once closed)."""
        return -1 if self._closed else self._sentinel

    @property
    def exitcode(self) -> int | None:
        with self._lock:
            if not self._closed:
                self._exitcode = self._process.exitcode
            return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        if self._pidfd is None:
            with self._lock:
                if not self._closed:
                    self._process.join(timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if not wait_readable(self._pidfd, timeout):
            return
        with self._lock:
            if not self._closed and self._process.exitcode is None:
                # forkserver: its server reports the status
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._process.join(left)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._exitcode = self._process.exitcode
            self._process.close()
            self._closed = True
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


class Child:
    """One child process, the client talking to it, and its standard error."""

    fd = -1  # the parent end's descriptor: readable once the hello (or a failure) is in

    def __init__(
        self,
        process: GuardedProcess,
        client: Client[Any],
        stderr: ChildStderr | None = None,
        method: str = "",
    ) -> None:
        self.process = process
        self.client = client
        self.core = client._core  # the connection, read on every call
        self.pid = cast(int, process.pid)
        self.exitcode: int | None = None
        self.generation = fork_generation()
        self.ended = False  # has_ended() saw it end
        self.counters: Counters | None = None  # the server's, which counts its deaths
        self._local = threading.local()
        self.stderr = stderr
        self.method = method
        self.stopping = False  # stop() began: an end from then on is ours, not news
        self.death_logged = False

    def sentinel_fired(self) -> bool:
        """Has the process ended? One ``poll`` of its sentinel."""
        if self.process.sentinel < 0:  # closed by a restart in another thread
            return True
        # A poll object per thread: one select.poll may not be polled by two threads at once.
        poll: select.poll | None = getattr(self._local, "poll", None)
        if poll is None:
            poll = self._local.poll = select.poll()
            poll.register(self.process.sentinel, select.POLLIN)
        return bool(poll.poll(0))

    def has_ended(self) -> bool:
        if self.ended or self.exitcode is not None or self.sentinel_fired():
            self.ended = True  # the next call takes the slow path, whatever the watcher saw yet
            return True
        # Under forkserver the sentinel carries the exit status; once a join has read
        # it the sentinel may look quiet, but the process object remembers the code.
        with contextlib.suppress(ValueError):
            self.exitcode = self.process.exitcode
        return self.exitcode is not None

    def stop(self, graceful: float) -> None:
        """Stop the child and reap it.

        With ``graceful > 0`` (``close()``) the client is closed first, which asks
        the child to stop and fails calls in flight with ``ClientClosedError``;
        after ``graceful`` seconds it is SIGTERM, then SIGKILL. With 0 (a kill)
        the signals come first and calls in flight get ``WorkerDiedError``.
        """
        if self.generation != fork_generation():  # a forked copy: not ours to stop
            return
        died = not self.stopping and self.has_ended()
        self.stopping = True
        if graceful > 0:
            self.client.close()
            self._join(graceful)
        if self.exitcode is None:
            signal_group(self.pid, signal.SIGTERM)
            self._join(KILL_GRACE)
        if self.exitcode is None:
            signal_group(self.pid, signal.SIGKILL)
            self._join(5.0)
        signal_group(self.pid, signal.SIGKILL)  # grandchildren left in the group
        self.client.connection_lost("the server process was killed")
        self.client.close()
        if self.exitcode is not None:
            with contextlib.suppress(ValueError):
                self.process.close()
        if self.stderr is not None:  # its last words reach our stderr before we return
            self.stderr.finish()
        if died:
            self._log_death()

    def note_death(self, error: BaseException) -> None:
        """``error`` came of this child's death: give it the stderr tail, log the death once."""
        if not isinstance(error, WorkerDiedError):
            return
        if self.stderr is not None:
            error.stderr_tail = self.stderr.tail()
        if not self.stopping:
            self._log_death(error.exitcode)

    def _log_death(self, exitcode: int | None = None) -> None:
        if self.death_logged:
            return
        self.death_logged = True
        if exitcode is None:
            exitcode = self.exitcode
        if self.counters is not None:
            self.counters.died(_reason(exitcode))
        last = ""
        if self.stderr is not None:
            self.stderr.finish()
            last = self.stderr.last_line()
        log().warning(
            "server process %d died: %s (exit code %s); last line on its stderr: %r",
            self.pid,
            _reason(exitcode),
            exitcode,
            last,
        )

    def _join(self, timeout: float) -> None:
        with contextlib.suppress(ValueError, AssertionError):
            self.process.join(timeout)
            self.exitcode = self.process.exitcode


def death_hint(limits: Limits | None, stderr: ChildStderr) -> Callable[[int], str]:
    """The client's ``death_hint``: the limits' guess, then the end of the child's stderr.

    It holds the limits' own method, not the server's: a method of the server would
    keep it alive through the handle, which its finalizer holds, and it would never
    be collected.
    """
    explain = None if limits is None else limits.explain

    def hint(exitcode: int) -> str:
        return ("" if explain is None else explain(exitcode)) + stderr.death_note()

    return hint


_LOGGER: logging.Logger | None = None


def log() -> logging.Logger:
    """The ``"pipe_rpc"`` logger, importing ``logging`` on first use: a child never needs it.

    A library's logger gets a ``NullHandler``, so that a program that has not set up
    logging does not get our warnings printed by logging's last-resort handler.
    """
    global _LOGGER
    if _LOGGER is None:
        import logging

        logger = logging.getLogger("pipe_rpc")
        logger.addHandler(logging.NullHandler())
        _LOGGER = logger
    return _LOGGER


def _reason(exitcode: int | None) -> str:
    """A death's reason in a word: ``"SIGSEGV"``, ``"exit 3"``."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        return describe_exitcode(exitcode).removeprefix("killed by ")
    return f"exit {exitcode}"


class ServerHandle:
    """What must be cleaned up for a ``Server``, kept apart so GC and exit can do it."""

    def __init__(self) -> None:
        self.child: Child | None = None
        self.lock = threading.RLock()
        self.closed = False

    def shutdown(self, graceful: float) -> None:
        with self.lock:
            was_closed = self.closed
            self.closed = True
            child = self.child
        if child is not None:
            child.stop(graceful)
            if not was_closed and child.generation == fork_generation():
                log().info(
                    "server process %d closed: %s (start method %s)",
                    child.pid,
                    describe_exitcode(child.exitcode),
                    child.method,
                )


LIVE: weakref.WeakSet[ServerHandle] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: our
    # non-daemonic children are gone before multiprocessing would join them.
    children: list[Child] = []
    for handle in list(LIVE):
        with handle.lock:
            handle.closed = True
            child = handle.child
        if child is not None and child.generation == fork_generation():
            children.append(child)
    stop_together(children, graceful=1.0)


def stop_together(children: list[Child], graceful: float) -> None:
    """Stop every child at once: the whole takes about one grace, not one per child.

    Each step (ask, SIGTERM, SIGKILL) goes to all of them before any wait, and the
    waits share one deadline; then each is reaped and closed as ``stop`` does.
    """
    for child in children:
        with contextlib.suppress(Exception):
            child.client.close()  # asks the child to stop; calls in flight fail
    _join_all(children, graceful)
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        left = [child for child in children if child.exitcode is None]
        for child in left:
            signal_group(child.pid, sig)
        _join_all(left, wait)
    for child in children:
        child.stop(graceful=0)  # reaps what is left and closes the handles, at once now


def _join_all(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        if child.exitcode is None:
            child._join(max(0.0, deadline - time.monotonic()))
