"""How a connection ends: broken by a failed read or write, lost with its peer, or closed.

Every read and write failure goes through ``_io_failed``: frames that came
before the failure are handed out first (a last reply may precede the end),
then the connection is *broken* with the one error that says why
(``StartupError``, ``ProtocolError``, ``WorkerDiedError`` with the exit code,
``ConnectionLostError``, or ``ClientClosedError`` after ``close()``), every
pending call is failed with a fresh copy of it, and so is every later call.
``close()`` shuts the pipe down first, which ends every wait and write on it at
once, and closes the descriptor only under both locks (see ``_connection``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from typing import Any

from ._errors import (
    ClientClosedError,
    ConnectionLostError,
    PipeRPCError,
    ProtocolError,
    StartupError,
    WorkerDiedError,
    describe_exitcode,
)
from ._lanes import SideChannels
from ._liveness import HasSentinel, fork_generation, wait_exitcode
from ._messages import Shutdown
from ._pending import PendingCall, Waiters
from ._protocol import ClientProtocol, StartupFailedSignal
from ._proxy import fresh_error
from ._transport import PeerGone, Transport, WriteTimeout, shutdown

#: How long a lost connection waits for the peer process's exit code.
_EXIT_GRACE = 2.0
#: What a transport raises when the connection is dead or broke the protocol.
IO_ERRORS = (PeerGone, ProtocolError, StartupFailedSignal, OSError)


class Ending:
    """The state every part of a connection shares (``Connection.__init__`` sets it),
    and how the connection ends: a failed read or write breaks it with the error
    that says why, and ``close()`` ends it on purpose."""

    _conn: Pipe
    _process: HasSentinel | None
    generation: int
    protocol: ClientProtocol[PendingCall]
    pipe: Transport
    lanes: SideChannels
    closed: bool
    broken: PipeRPCError | None
    pump: Any
    lone: int
    death_hint: Callable[[int], str]
    death_tail: Callable[[], str]
    _write_lock: threading.RLock
    _read_lock: threading.RLock
    _waiters: Waiters

    def _hand_out(self, transport: Transport) -> None:
        """Settle the call of each frame in ``transport.ready``, oldest first.

        A frame leaves ``ready`` only after its call is settled: an interrupt in
        between leaves it to be handed out again, which settles nothing twice.
        """
        ready = transport.ready
        receive = self.protocol.receive
        while ready:
            receive(ready[0])
            ready.popleft()

    def _io_failed(self, exc: BaseException, transport: Transport | None) -> None:
        """A read or write raised ``exc``: hand out what came before it, then break the
        connection with the error that says why."""
        if transport is not None and isinstance(exc, PeerGone):
            try:
                self._hand_out(transport)  # a last reply may have come before the end
            except (ProtocolError, StartupFailedSignal) as later:
                exc = later
        self._break(self._error_for(exc))

    def _error_for(self, exc: BaseException) -> PipeRPCError:
        if self.broken is not None:
            return self.broken
        if isinstance(exc, StartupFailedSignal):
            error = exc.message.error
            failure = StartupError(
                f"the factory failed in the child: {error!r}",
                remote_traceback=str(error.__cause__ or ""),
            )
            failure.__cause__ = error
            return failure
        if isinstance(exc, ProtocolError):
            return exc
        if isinstance(exc, PeerGone):
            return self._lost(str(exc))
        return ClientClosedError("the client was closed") if self.closed else self._lost(repr(exc))

    def connection_lost(self, reason: str) -> None:
        """Fail every pending and later call as if the peer had gone (its exit code if known)."""
        if self.broken is None and not self.closed:
            self._break(self._lost(reason))

    def _break(self, error: PipeRPCError) -> None:
        """The connection is dead: every pending call and every later call gets ``error``."""
        if self.broken is None:
            self.broken = error
            self.lanes.wake_all()  # the threads waiting on their own
        broken = self.broken
        self.protocol.fail_all(lambda: fresh_error(broken))

    def _lost(self, reason: str) -> PipeRPCError:
        """The error for a peer that went away: ``WorkerDiedError`` when we know its process."""
        if self.closed:
            return ClientClosedError("the client was closed")
        process = self._process
        if process is None:
            return ConnectionLostError(f"the connection to the server was lost: {reason}")
        exitcode = wait_exitcode(process, _EXIT_GRACE)
        pid = getattr(process, "pid", None)
        if exitcode is None:
            return ConnectionLostError(
                f"the connection to server process {pid} was lost ({reason}), "
                "but the process has not exited"
            )
        methods = tuple(dict.fromkeys(s.method for s in self.protocol.slots() if s.method))
        running = f" while running {', '.join(f'{m}()' for m in methods)}" if methods else ""
        hint = self.death_hint(exitcode)
        return WorkerDiedError(
            f"server process {pid} {describe_exitcode(exitcode)}{running}{hint}",
            exitcode=exitcode,
            stderr_tail=self.death_tail(),
            methods=methods,
        )

    def close(self) -> None:
        """Ask the server to stop, fail calls in flight (``ClientClosedError``), close the pipe."""
        if self.generation != fork_generation():
            self.close_inherited()
            return
        if self.closed:
            return
        self.closed = True
        self._say_goodbye()
        shutdown(self._conn)  # every read and write of the pipe ends now
        self._break(ClientClosedError("the client was closed"))
        if self.lanes.monitor is not None:
            self.lanes.monitor.stop()
        self._close_descriptor()
        self.pump = None  # it holds this connection: no cycle left for the collector

    def _say_goodbye(self) -> None:
        """Send ``Shutdown``, briefly: a frame an interrupted caller left is finished first."""
        lock = self._write_lock
        try:
            if lock.acquire(True, 0.5) and self.broken is None:
                self.pipe.write(self.protocol.codec.encode(Shutdown()), time.monotonic() + 0.5)
        except (PeerGone, WriteTimeout, OSError):
            pass
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def _close_descriptor(self) -> None:
        """Close the pipe under both locks, so that no thread is using its number.

        A lock still held after a second means a thread stuck outside pipe_rpc's
        control: the descriptor is then left to the garbage collector.
        """
        writing, reading = self._write_lock, self._read_lock
        try:
            if writing.acquire(True, 1.0) and reading.acquire(True, 1.0):
                self._conn.close()
        finally:
            try:
                reading.release()
            except RuntimeError:  # this thread did not hold it
                pass
            try:
                writing.release()
            except RuntimeError:
                pass

    def close_inherited(self) -> None:
        """In a forked child: drop this process's copies of the descriptors, touching
        nothing the owner shares (no shutdown, no goodbye)."""
        self.closed = True
        self.broken = self.broken or ClientClosedError("the client belongs to another process")
        self._write_lock = threading.RLock()
        self._read_lock = threading.RLock()
        self._conn.close()
