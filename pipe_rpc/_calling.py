"""The life of a registered call: register, write on its lane, wait, end early.

``_run`` is the one path of every call that is not read in place (see
``_connection``): it registers the call inside its ``try``, so that an interrupt
anywhere after ends that call alone, writes its frame on its lane, and waits.
Writes to the pipe go under the write lock; a frame an interrupted writer left is
finished by the next writer. The front-ends that do not block (asyncio,
``submit``, streams) write with ``write_nowait`` and ``flush_nowait`` and send a
stream's credit and cancel frames with ``control``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from ._ending import IO_ERRORS
from ._errors import CallTimeoutError
from ._lanes import SideChannel
from ._liveness import GENERATION, check_owner, fork_generation
from ._messages import Cancel, Channel, Credit, Describe, Get, OpenChannel
from ._pending import PendingCall
from ._proxy import fresh_error
from ._reading import Reading
from ._transport import WriteTimeout, remaining
from ._wire import Buffer


class Calling(Reading):
    """How a registered call is written and waited for (see the module's docstring)."""

    def check_usable(self) -> None:
        """Raise at once if a call cannot start: another process's, closed or dead."""
        if self.generation != fork_generation():
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)

    def abandon(self, call_id: int) -> bool:
        """Give up on a call (its late reply is dropped); False if it had an outcome."""
        return self.protocol.abandon(call_id)

    def _run(
        self,
        pending: PendingCall,
        timeout: float | None,
        make: Callable[[int], Get | Describe] | None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Register a call (``pending.method(*args, **kwargs)``, or the request ``make``
        makes), write it on its lane, and wait for its outcome."""
        if self.generation != GENERATION[0]:
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self.lanes.local
        channel = local.channel
        if channel is None and local.contended and not local.main:
            channel = self.lanes.lane(deadline)
        if self.protocol.pending:  # another call is in flight: this thread contends
            local.contended = True
        call_id = 0
        try:  # registered inside the try: an interrupt anywhere after ends this call alone
            if make is None:
                call_id, frame = self.protocol.start(pending.method, args, kwargs or {}, pending)
            else:
                call_id, frame = self.protocol.request(make, pending)
            if channel is None:
                self._send(frame, deadline)
                self._wait_pipe(pending, deadline)
            else:
                self._send_channel(channel, frame, deadline)
                self._wait_channel(channel, pending, deadline)
        except WriteTimeout:
            self._end_early(call_id, channel)
            raise CallTimeoutError(
                f"{pending.method}() timed out after {timeout} s waiting to send"
            ) from None
        except BaseException:
            if call_id:
                self._end_early(call_id, channel)
            raise
        return self._outcome(pending, call_id, channel, timeout)

    def _outcome(
        self, pending: PendingCall, call_id: int, channel: SideChannel | None, timeout: float | None
    ) -> Any:
        """A waited-for call's value, or raise its error (or why it ended without one)."""
        if not pending.done:  # the deadline passed, or the connection broke
            self._end_early(call_id, channel)
            if not pending.settled():  # it may have been settled as it was abandoned
                if self.broken is not None:
                    raise fresh_error(self.broken)
                raise CallTimeoutError(f"{pending.method}() timed out after {timeout} s")
        if pending.ok:
            return pending.value
        raise pending.value

    def _end_early(self, call_id: int, channel: SideChannel | None) -> None:
        """A call leaves without its outcome: forget it, and drop a side channel it used."""
        self.protocol.abandon(call_id)
        if channel is not None:
            # Nobody would read its late reply: a big one would block the server's
            # write, and every other caller with it. Closing makes that write fail.
            self.lanes.drop(channel)

    def _send(self, frame: list[Buffer], deadline: float | None, fds: Sequence[int] = ()) -> None:
        """Write a registered call's frame on the pipe (under the write lock)."""
        lock = self._write_lock
        try:
            if deadline is None:
                lock.acquire()
            elif not lock.acquire(True, cast(float, remaining(deadline))):
                raise WriteTimeout("waiting to send")
            if self.broken is not None:  # checked under the lock: close() closes under it
                return
            self.pipe.write(frame, deadline, fds)
        except IO_ERRORS as exc:
            self._io_failed(exc, None)
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def _send_channel(
        self, channel: SideChannel, frame: list[Buffer], deadline: float | None
    ) -> None:
        try:
            channel.transport.write(frame, deadline)
        except IO_ERRORS as exc:
            self._io_failed(exc, None)

    def _request(
        self,
        make: Callable[[int], OpenChannel | Channel],
        deadline: float | None,
        fds: Sequence[int] = (),
    ) -> bool:
        """Ask the server machinery for something (``make(call_id)``); True if it granted it."""
        pending = PendingCall()
        call_id, frame = self.protocol.request(make, pending)
        try:
            self._send(frame, deadline, fds)
            self._wait_pipe(pending, deadline)
        except WriteTimeout:
            self.protocol.abandon(call_id)
            return False
        except BaseException:
            self.protocol.abandon(call_id)
            raise
        if not pending.done:
            self.protocol.abandon(call_id)
            return False
        if not pending.ok and self.broken is None:
            self.lanes.ok = False  # refused: the server cannot take side channels
        return pending.ok

    def write_nowait(self, frame: list[Buffer]) -> bool | None:
        """Write a registered call's frame on the pipe without waiting for anything.

        True: it went whole. None: part of it went, and the rest is queued (the next
        writer, or ``flush_nowait``, finishes it). False: nothing went (the write lock
        was busy, or the socket full): try again later.
        """
        lock = self._write_lock
        try:
            if not lock.acquire(False):
                return False
            if self.broken is not None:
                raise fresh_error(self.broken)
            self.pipe.write(frame, time.monotonic())
            return True
        except WriteTimeout:
            if self.pipe.unsent_untouched():
                self.pipe.drop_unstarted()
                return False
            return None
        except IO_ERRORS as exc:
            self._io_failed(exc, None)
            raise fresh_error(self.broken) from None  # type: ignore[arg-type]
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def flush_nowait(self) -> bool:
        """Go on writing a frame ``write_nowait`` left part-written; True once none is left."""
        lock = self._write_lock
        try:
            if not lock.acquire(False):
                return False
            if self.broken is not None:
                return True
            self.pipe.flush(time.monotonic())
            return True
        except WriteTimeout:
            return False
        except IO_ERRORS as exc:
            self._io_failed(exc, None)
            return True
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def start_stream(self, call: PendingCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Register and send a call of a generator method (``call`` takes its items).

        Streams go on the pipe, whatever the thread: their credit and cancel frames
        follow on it.
        """
        self.check_usable()
        call_id = 0
        try:
            call_id, frame = self.protocol.start(call.method, args, kwargs, call)
            self._send(frame, None)
        except BaseException:
            if call_id:
                self.abandon(call_id)
            raise
        return call_id

    def wait_for(self, call: PendingCall, deadline: float | None) -> None:
        """Wait on the pipe until ``call`` has something (``done``), its deadline passed,
        or the connection broke."""
        self._wait_pipe(call, deadline)

    def control(self, message: Credit | Cancel) -> None:
        """Send a stream's credit or cancel; on a dead connection there is nothing to do."""
        if self.broken is not None:
            return
        frame = self.protocol.codec.encode(message)
        try:
            self._send(frame, time.monotonic() + 5.0)
        except WriteTimeout:
            pass
