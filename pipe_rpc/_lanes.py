"""Side channels: a thread's own connection to the server, and the policy that gives one.

A thread other than the main one that has found another call in flight gets a
socket pair of its own on its next call (see ``_protocol``): one end is sent to
the server over the pipe, the other is the thread's lane. The main thread,
where signal handlers run, stays on the pipe: a side channel is made of bare
descriptors, and an interrupt landing between making one and handing it to its
owner would leak it. ``SideChannels`` holds a connection's channels, the
thread-local state that picks a lane, and the monitor that wakes every channel
when the server process ends (a thread asleep on a doorbell does not watch it).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from ._liveness import PeerMonitor, register_holder
from ._messages import Channel, OpenChannel
from ._protocol import MAX_CHANNELS
from ._transport import Transport, enlarge_buffers, shutdown

#: ``request(make, deadline, fds)``: ask the server machinery on the pipe; True if granted.
Request = Callable[[Callable[[int], OpenChannel | Channel], float | None, Sequence[int]], bool]


class SideChannel:
    """A calling thread's own connection to the server; closed when the thread is gone.

    It holds bare descriptors, not a socket object: it may be collected with its
    client in a reference cycle, in any order, and must close quietly.
    ``doorbell``: its eventfd, or -1. ``call``: see ``Connection._call_on``.
    ``lock`` keeps ``wake()`` (another thread) and ``close()`` apart, so that a wake
    never touches a reused descriptor. It is reentrant: a garbage collection that
    starts inside ``wake()`` may run a finalizer that breaks the same client, which
    wakes this channel again.
    """

    __slots__ = ("__weakref__", "call", "doorbell", "fd", "lock", "transport")

    def __init__(
        self, sock: socket.socket, doorbell: int, sentinel: int | None, max_frame: int | None
    ) -> None:
        self.lock = threading.RLock()
        self.fd = sock.detach()
        self.doorbell = doorbell
        self.call = 0  # the id of the call its thread reads in place (0: none)
        # The main thread never has one: no signal handler runs in its owner thread.
        self.transport = Transport(self, sentinel=sentinel, max_frame=max_frame, guarded=False)
        register_holder(self)

    def fileno(self) -> int:
        return self.fd

    def wake(self) -> None:
        """Wake the thread waiting on the channel, to find end of file (the socket is shut
        down both ways) or, at its next call, a broken client."""
        with self.lock:
            if self.fd >= 0:
                shutdown(self)
            if self.doorbell >= 0:
                os.eventfd_write(self.doorbell, 1)

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
            doorbell, self.doorbell = self.doorbell, -1
        if fd >= 0:
            _close(fd)
        if doorbell >= 0:
            _close(doorbell)

    def close_inherited(self) -> None:
        # A thread of the parent may have held the lock as it forked: it stays held here.
        self.lock = threading.RLock()
        self.close()

    def __del__(self) -> None:
        self.close()


class LaneState(threading.local):
    """What a connection keeps for each calling thread about its lane."""

    def __init__(self) -> None:
        self.channel: SideChannel | None = None
        self.contended = False  # a call of this thread found another call in progress
        self.main = threading.current_thread() is threading.main_thread()


class SideChannels:
    """A connection's side channels: which thread gets one, opening, dropping, waking.

    Args:
        request: asks the server on the pipe (``Connection._request``).
        usable: the pipe can pass descriptors (a Unix stream socket).
        sentinel: the server process's sentinel (``None``: not watched, and no doorbells).
        max_frame: the connection's bound on replies.
    """

    def __init__(
        self, request: Request, usable: bool, sentinel: int | None, max_frame: int | None
    ) -> None:
        self.local = LaneState()
        self.ok = usable  # False once the server refused one: never asked again
        self.monitor: PeerMonitor | None = None  # started with the first channel
        self._request = request
        self._sentinel = sentinel
        self._max_frame = max_frame
        self._channels: weakref.WeakSet[SideChannel] = weakref.WeakSet()
        self._lock = threading.Lock()  # the count of channels and the monitor's start
        self._opening = 0  # side channels being opened right now

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterator[SideChannel]:
        return iter(list(self._channels))

    def lane(self, deadline: float | None) -> SideChannel | None:
        """This thread's side channel, opening one if it found contention (None: the pipe)."""
        state = self.local
        channel = state.channel
        if channel is None and state.contended and self.ok and not state.main:
            channel = self._open(state, deadline)
        return channel

    def drop(self, channel: SideChannel) -> None:
        """Stop using this thread's side channel (its next contended call asks again)."""
        state = self.local
        if state.channel is channel:
            state.channel = None
        self._channels.discard(channel)
        channel.close()

    def wake_all(self) -> None:
        """Wake every thread waiting on its channel (the connection broke)."""
        _wake_all(self._channels)

    def _open(self, state: LaneState, deadline: float | None) -> SideChannel | None:
        """Give this thread a side channel; ``None`` if it cannot have one now.

        Two exchanges on the pipe: ``OpenChannel`` (the server gets ready to take a
        descriptor), then ``Channel`` with one end of a new socket pair. A refusal
        turns side channels off for this client; a timeout gives up for this call.
        """
        state.contended = False
        with self._lock:  # other threads may be opening theirs right now
            if len(self._channels) + self._opening >= MAX_CHANNELS:
                return None
            self._opening += 1
        try:
            channel = self._new(deadline)
        finally:
            with self._lock:
                self._opening -= 1
        if channel is None:
            return None
        self._channels.add(channel)
        self._start_monitor()
        if self.monitor is not None and self.monitor.ended:
            channel.wake()  # it looked before this was added
        state.channel = channel
        return channel

    def _new(self, deadline: float | None) -> SideChannel | None:
        try:
            ours, theirs = socket.socketpair()
        except OSError:  # out of descriptors here: share the pipe for now
            return None
        # A doorbell only where the monitor will ring it if the server process ends.
        doorbell = _new_doorbell() if self._sentinel is not None else -1
        fds = [theirs.fileno()] if doorbell < 0 else [theirs.fileno(), doorbell]
        granted = False
        try:
            granted = self._request(OpenChannel, deadline, ()) and self._request(
                functools.partial(Channel, doorbell=doorbell >= 0), deadline, fds
            )
        except OSError:  # the descriptors could not be sent: share the pipe from now on
            self.ok = False
        finally:  # an exception too: the doorbell is a bare descriptor, nothing else closes it
            theirs.close()
            if not granted:
                ours.close()
                if doorbell >= 0:
                    os.close(doorbell)
        if not granted:
            return None
        enlarge_buffers(ours)
        return SideChannel(ours, doorbell, self._sentinel, self._max_frame)

    def _start_monitor(self) -> None:
        """Watch the server's process once there is a side channel.

        Not before: a thread in a process that had none would make a later
        ``fork`` start method fork a multi-threaded parent.
        """
        if self._sentinel is None or self.monitor is not None:
            return
        with self._lock:
            if self.monitor is None:
                # The channels, not this object: the monitor must not keep it alive.
                wake = functools.partial(_wake_all, self._channels)
                self.monitor = PeerMonitor(self._sentinel, wake)
                weakref.finalize(self, self.monitor.stop)


def _wake_all(channels: weakref.WeakSet[SideChannel]) -> None:
    for channel in list(channels):
        channel.wake()


def _new_doorbell() -> int:
    """A new eventfd for a side channel (-1: the system has none, or no descriptor is left)."""
    eventfd = getattr(os, "eventfd", None)
    if eventfd is None:
        return -1
    try:
        return cast(int, eventfd(0, os.EFD_CLOEXEC))
    except OSError:
        return -1
