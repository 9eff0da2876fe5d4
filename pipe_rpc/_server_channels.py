"""The server's channels: the pipe and the side channels a client sends it, and their admission.

Theory of operation. A client thread that finds another call in progress asks
for a side channel of its own (``OpenChannel``); the server grants it unless
the pipe cannot pass descriptors or ``_MOST_CHANNELS`` are open, and then
reads the pipe with ``recvmsg`` until the ``Channel`` frame brings the socket
(and, with a doorbell, an eventfd). The descriptors are checked before they
are served (``check_channel``): a Unix stream socket, an eventfd, and within
a quarter of the open-file limit, so that the service's own files keep the
rest. A refusal is a ``Fail`` the client takes as "no side channels".

Each ``ServerChannel`` answers on the connection its calls came by, ringing
the doorbell, if it has one, before each write. A side channel that reaches
end of file is dropped; its client thread is gone.
"""

from __future__ import annotations

import os
import socket
import threading
from multiprocessing.connection import Connection

from ._messages import Channel as ChannelFrame
from ._messages import Fail, FailKind, OpenChannel
from ._protocol import MAX_CHANNELS, ServerProtocol
from ._transport import Poller, Transport, enlarge_buffers, is_unix_stream, shutdown
from ._wire import Buffer

#: The most side channels a server takes. A client opens at most ``MAX_CHANNELS``,
#: but the ends of threads that have just ended may not have been read as closed
#: yet, and a refusal turns side channels off for the client for good.
_MOST_CHANNELS = 2 * MAX_CHANNELS


def _is_eventfd(fd: int) -> bool:
    """Is ``fd`` an eventfd? (True where there is no ``/proc`` to ask.)"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return True


def _descriptor_budget() -> int | None:
    """How many descriptors this process's side channels may hold: a quarter of its
    open-file limit, so that the service's own files keep the rest (``None``: no limit
    known)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return soft // 4


class ServerChannel:
    """The server's end of one connection: the pipe, or a side channel it was sent.

    ``doorbell``: the side channel's eventfd, rung before each write and at close.
    """

    def __init__(
        self,
        conn: Connection | socket.socket,
        protocol: ServerProtocol,
        doorbell: int | None = None,
    ) -> None:
        self.conn = conn  # a side channel's socket is closed when it is dropped
        self.transport = Transport(conn, guarded=False)  # an interrupt ends the loop anyway
        self.protocol = protocol
        self.doorbell = doorbell
        self.lock = threading.Lock()  # pool threads write replies under it
        self.closed = False

    @property
    def descriptors(self) -> int:
        """How many descriptors the channel holds."""
        return 1 if self.doorbell is None else 2

    def write(self, segments: list[Buffer]) -> None:
        """Write without the lock: for the loop's thread when there is no pool."""
        if self.doorbell is not None:
            os.eventfd_write(self.doorbell, 1)
        self.transport.write(segments)

    def send(self, segments: list[Buffer]) -> None:
        with self.lock:
            if not self.closed:
                self.write(segments)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if isinstance(self.conn, socket.socket):
                # Shut down first: a process the service forked may hold the socket too,
                # and the caller woken by the ring below must read end of file.
                shutdown(self.conn)
                self.conn.close()
            doorbell, self.doorbell = self.doorbell, None
            if doorbell is not None:
                os.eventfd_write(doorbell, 1)
                os.close(doorbell)


class SideChannelsServed:
    """The server loop's side channels: granting, taking, checking and dropping them."""

    #: The pipe.
    main: ServerChannel
    #: The side channels, by descriptor.
    side: dict[int, ServerChannel]
    #: Waits on the pipe and the side channels at once, once there are side channels.
    poller: Poller | None
    #: Whether the pipe can pass descriptors.
    takes_channels: bool
    #: Channels granted whose descriptor has not come yet.
    awaited: int

    def open_channel(self, message: OpenChannel) -> list[Buffer]:
        """Grant a side channel, or refuse it; its descriptors come with the next ``Channel``."""
        transport = self.main.transport
        if not self.takes_channels:
            return self.refuse(message.call_id, "the pipe cannot pass descriptors")
        if len(self.side) >= _MOST_CHANNELS:
            return self.refuse(message.call_id, f"{_MOST_CHANNELS} side channels are open")
        self.awaited += 1
        if transport.fds is None:
            transport.fds = []
        return self.main.protocol.reply(message.call_id, True, None)

    def take_channel(self, message: ChannelFrame) -> list[Buffer]:
        """Serve the side channel whose descriptors came with ``message``, or refuse it."""
        protocol = self.main.protocol
        transport = self.main.transport
        fds = transport.fds or []
        wanted = 2 if message.doorbell else 1
        came = fds[:wanted]
        del fds[:wanted]
        self.awaited = max(0, self.awaited - 1)
        if not self.awaited:  # back to plain reads of the pipe
            for stray in fds:
                os.close(stray)
            transport.fds = None
        if len(came) < wanted:
            for fd in came:
                os.close(fd)
            what = "its doorbell" if came else "a descriptor"
            why = " (dropped: the open-file limit?)" if transport.fds_lost else ""
            return self.refuse(message.call_id, f"the channel frame came without {what}{why}")
        fd, doorbell = came[0], (came[1] if message.doorbell else None)
        refusal = self.check_channel(fd, doorbell)
        if refusal is not None:
            for spare in came:
                os.close(spare)
            return self.refuse(message.call_id, refusal)
        sock = socket.socket(fileno=fd)
        enlarge_buffers(sock)
        side = ServerChannel(sock, ServerProtocol(protocol.codec, peer=protocol.peer), doorbell)
        self.side[side.transport.fd] = side
        if self.poller is None:
            self.poller = Poller()
            self.poller.add(self.main.transport)
        self.poller.add(side.transport)
        return protocol.reply(message.call_id, True, None)

    def check_channel(self, fd: int, doorbell: int | None) -> str | None:
        """Why the side channel of socket ``fd`` and ``doorbell`` is refused (``None``: it
        is not)."""
        count = 1 if doorbell is None else 2
        # Checked here, not at OpenChannel: a grant whose Channel frame never comes (its
        # request timed out) must not use up the budget.
        budget = _descriptor_budget()
        held = sum(side.descriptors for side in self.side.values())
        if budget is not None and held + count > budget:
            return f"side channels may use {budget} descriptors, a quarter of the open-file limit"
        if not is_unix_stream(fd):
            return "the descriptor is not a Unix stream socket"
        if doorbell is not None and not _is_eventfd(doorbell):
            return "the doorbell is not an eventfd"
        return None

    def refuse(self, call_id: int, reason: str) -> list[Buffer]:
        return self.main.protocol.codec.encode(Fail(call_id, FailKind.NO_CHANNEL, reason))

    def drop(self, channel: ServerChannel) -> None:
        """Stop serving a side channel (its client thread is gone)."""
        assert self.poller is not None
        self.poller.remove(channel.transport)
        del self.side[channel.transport.fd]
        channel.close()
        if not self.side:
            self.poller = None
