"""Waiting for replies: leaders and followers on the pipe, a thread on its side channel.

On the pipe, the first waiting thread that takes the read lock *leads*: it
reads for everyone and settles each reply it reads, waking that call's owner;
the others *follow*, asleep on their own waiter. When the leader's own call is
settled it hands the lead to one follower. A follower never sleeps longer than
``_RECHECK`` before it looks whether the lead is free, so a wake-up lost to an
interrupt costs a moment, never a hang. On a side channel the caller is alone
by construction and reads for itself. An event loop reads through
``read_nowait`` when the pipe is readable. A deadline limits a wait; it never
picks another path.
"""

from __future__ import annotations

import os
import time

from ._ending import IO_ERRORS, Ending
from ._errors import CallTimeoutError
from ._lanes import SideChannel
from ._pending import Both, PendingCall
from ._proxy import fresh_error
from ._transport import PeerGone, remaining

#: A follower's longest sleep before it looks whether the lead is free.
_RECHECK = 0.05


class Reading(Ending):
    """How a connection's callers wait for their replies (see the module's docstring)."""

    def read_nowait(self, ended: bool = False, spin: bool = False) -> None:
        """Read what the pipe has and settle its calls, unless a leader is reading (then
        it does): for an event loop told that the pipe, or with ``ended`` the server
        process's sentinel, is readable. With ``spin``, first spin for frames as a sync
        caller does before it sleeps, never sleeping: for an event loop with one call
        in flight, whose reply most often comes within the spin window."""
        lock = self._read_lock
        pipe = self.pipe
        try:
            if lock.acquire(False):
                if spin:
                    if pipe.spin():
                        self._hand_out(pipe)
                    return
                pipe.read_available()
                pipe.note_reply()
                self._hand_out(pipe)
                if ended:
                    raise PeerGone("peer process ended")
        except IO_ERRORS as exc:
            self._io_failed(exc, pipe)
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass
            else:
                self._pass_lead()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the server's hello (``spawn`` uses this to surface ``StartupError``).

        The read lock is only ever tried for a moment: a leader holding it while it
        waits for a call (the hello came long ago) must not keep this thread from
        seeing that the hello is there.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._read_lock
        while self.protocol.peer is None and self.broken is None:
            left = remaining(deadline)
            if left == 0.0:
                raise CallTimeoutError(f"no hello from the server after {timeout} s")
            try:
                if lock.acquire(True, _RECHECK) and self.protocol.peer is None:
                    self.pipe.read(_RECHECK if left is None else min(left, _RECHECK))
                    self._hand_out(self.pipe)
            except IO_ERRORS as exc:
                self._io_failed(exc, self.pipe)
            finally:
                try:
                    lock.release()
                except RuntimeError:  # this thread did not hold it
                    pass
        if self.broken is not None:
            raise fresh_error(self.broken)

    def _wait_pipe(self, pending: PendingCall, deadline: float | None) -> None:
        """Return once ``pending`` is settled, its deadline passed, or the connection broke."""
        lock = self._read_lock
        left: float | None = None
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            led = False
            try:
                if lock.acquire(False):
                    led = True
                    self._lead(pending, deadline)
            finally:
                try:
                    lock.release()
                except RuntimeError:  # this thread did not hold it
                    pass
                else:
                    if self.protocol.pending:
                        self._pass_lead()
            if led:
                continue
            self.lanes.local.contended = True
            waiter = self._waiters.waiter
            current = pending.waiter
            if current is None:
                pending.waiter = waiter
            elif current is not waiter and getattr(current, "second", None) is not waiter:
                pending.waiter = Both(current, waiter)  # a future's waiter stays woken too
            if not pending.done:  # settled before it could see the waiter
                waiter.sleep(_RECHECK if left is None else min(left, _RECHECK))

    def _lead(self, pending: PendingCall, deadline: float | None) -> None:
        """As the pipe's reader, read and hand out until ``pending`` is settled.

        The loop hands out frames as ``_hand_out`` does, written out: it is every call's path.
        """
        pipe = self.pipe
        ready = pipe.ready
        protocol = self.protocol
        receive = protocol.receive
        left: float | None = None
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            alone = len(protocol.pending) < 2
            if not alone:  # reading for others too: this thread contends
                self.lanes.local.contended = True
            try:
                if not ready:  # frames left by an interrupted leader go first
                    pipe.read(left, alone)
                if len(ready) > 1:  # replies of others' calls came too
                    self.lanes.local.contended = True
                while ready:  # a frame leaves ``ready`` only once its call is settled
                    receive(ready[0])
                    ready.popleft()
            except IO_ERRORS as exc:
                self._io_failed(exc, pipe)

    def _pass_lead(self) -> None:
        """The leader left: wake one follower to read in its place."""
        if self.protocol.pending_count:  # (its callers on the hot path check first too)
            for slot in self.protocol.slots():
                waiter = slot.waiter
                if not slot.done and waiter is not None and waiter.leads:
                    waiter.wake()
                    return

    def _wait_channel(
        self, channel: SideChannel, pending: PendingCall, deadline: float | None, rang: bool = False
    ) -> None:
        """Read this thread's side channel until ``pending`` is settled or its deadline passed.

        With no deadline and a doorbell the caller sleeps on the doorbell first, at
        most once a call (the ring it took may be for a reply still being written).
        """
        transport = channel.transport
        ready = transport.ready
        receive = self.protocol.receive
        rang = rang or channel.doorbell < 0 or deadline is not None
        left: float | None = None
        # ``_hand_out`` written out: this is every call's path in a thread with a
        # channel, and the threads take turns at the GIL for each frame of it.
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            try:
                if not ready:
                    if not rang:
                        rang = True
                        os.eventfd_read(channel.doorbell)
                        # The server rings just before it writes the reply, which has most
                        # often come by the time this thread runs: read before any poll
                        # (each system call is a turn at the GIL for every calling thread).
                        transport.read_available()
                    if not ready:
                        transport.read(left, False)
                while ready:  # a frame leaves ``ready`` only once its call is settled
                    receive(ready[0])
                    ready.popleft()
            except IO_ERRORS as exc:
                self._io_failed(exc, transport)
