"""The server loop: ``serve()``, reading requests and answering them.

Theory of operation. One thread reads requests, on the pipe alone or, once a
client has sent side channels (``_server_channels``), on all of them at once,
and answers each frame on the channel it came by. A call is run as
``_server_runs`` says: with ``max_concurrency=1`` the loop's thread runs each
call itself, in arrival order, and writes the replies of everything it read in
one go (fewer system calls when a client pipelines; a call that ran longer than
``_FLUSH_AFTER`` flushes what is held); with ``N > 1`` calls run on a pool of N
threads, each writing its own reply under its channel's lock. ``async def``
methods run on an event loop of their own, and generator methods become streams
that the loop advances between its reads: while one has room in its window the
loop reads without waiting. The names a peer may reach are ``_dispatch``'s.

A side channel that reaches end of file is dropped; the pipe's end of file ends
the loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection

from ._codec import Codec
from ._dispatch import Dispatcher
from ._errors import ProtocolError
from ._messages import Call, Cancel, Credit, Describe, Fail, Get, OpenChannel, Shutdown
from ._messages import Channel as ChannelFrame
from ._protocol import ServerProtocol
from ._server_channels import ServerChannel, SideChannelsServed
from ._server_runs import RunStrategies, send_locked, thread_pool
from ._streams import Streams
from ._transport import PeerGone, enlarge_buffers, is_unix_stream
from ._wire import Body, Buffer

#: A serial call that ran longer than this flushes replies held for batching.
_FLUSH_AFTER = 0.001
#: Frames that run service code, and a stream consumer's frames. (Tuples: an ``X | Y``
#: in ``isinstance`` builds a union object on every call.)
_CALLS = (Call, Get)
_CONTROLS = (Credit, Cancel)


def serve(
    service: object,
    conn: Connection,
    *,
    max_concurrency: int = 1,
    untrusted: bool = False,
    allowed_types: Iterable[type] = (),
) -> None:
    """Serve ``service`` on ``conn`` until the peer closes or asks to stop.

    The other end of the pipe is a ``Client``; ``spawn()`` runs this in its child.
    Only the public methods of ``service`` can be called, and its public properties
    and data attributes read.

    Example::

        parent, child = multiprocessing.Pipe()
        p = multiprocessing.Process(target=pipe_rpc.serve, args=(Calculator(), child))
        p.start(); child.close()
        with pipe_rpc.Client[Calculator](parent, process=p) as client:
            assert client.proxy.add(1, 2) == 3

    Args:
        service: the object whose public methods may be called.
        conn: this side of a duplex ``multiprocessing.Pipe``.
        max_concurrency: how many calls may run at once (threads); 1 runs them in order.
        untrusted: the peer does not trust this process (its ``Client`` has
            ``untrusted=True``): replies name every class by reference, never by
            value, and a result holding a type outside ``allowed_types`` fails its
            call with ``SerializationError`` instead of being sent.
        allowed_types: the peer's ``allowed_types``.

    Raises:
        ValueError: ``max_concurrency`` is not a positive integer.
        ProtocolError: the peer broke the wire protocol.
    """
    check_max_concurrency(max_concurrency)
    codec = Codec(by_reference=True, allowed_types=allowed_types) if untrusted else Codec()
    _Loop(service, conn, max_concurrency, codec).run()


def check_max_concurrency(max_concurrency: int) -> None:
    """Raise ``ValueError`` unless ``max_concurrency`` is an int >= 1."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")


class _Loop(RunStrategies, SideChannelsServed):
    def __init__(
        self, service: object, conn: Connection, max_concurrency: int, codec: Codec
    ) -> None:
        self.dispatcher = Dispatcher(service)
        self.main = ServerChannel(conn, ServerProtocol(codec, kinds=self.dispatcher.kinds()))
        enlarge_buffers(conn)
        self.side = {}
        self.poller = None
        self.takes_channels = is_unix_stream(conn)
        # A grant whose Channel frame never comes (the client gave up) only leaves the
        # pipe read with recvmsg.
        self.awaited = 0
        self.max_concurrency = max_concurrency
        self.plain = codec.by_reference is None
        self.coroutines = None
        self.streams = Streams(send_locked)
        self.pool = thread_pool(max_concurrency)

    def run(self) -> None:
        try:
            self.main.send(self.main.protocol.greeting())
            while self.step():
                pass
        except PeerGone:
            pass
        finally:
            self.stop_runs()
            for channel in self.side.values():
                channel.close()
            for fd in self.main.transport.fds or ():
                os.close(fd)

    def step(self) -> bool:
        """Read once and answer what came, then advance open streams; False once the
        peer is done. With a stream that has room in its window, nothing waits."""
        if self.streams.open and self.streams.runnable():
            if not self._read_without_waiting():
                return False
            self.streams.advance()
            return True
        if self.poller is None:  # the pipe alone (whose end ends the loop: no ``answer``)
            return self._answer(self.main, self.main.transport.read_blocking())
        for transport in self.poller.wait():
            channel = self.side.get(transport.fd, self.main)
            try:
                transport.read_available()
            except PeerGone:
                if channel is self.main:
                    return False
                self.drop(channel)
                continue
            bodies = transport.take()
            if bodies and not self.answer(channel, bodies):
                return False
        return True

    def _read_without_waiting(self) -> bool:
        """``step()``'s reading, for when streams are waiting to be advanced."""
        channels = [self.main, *self.side.values()]
        for channel in channels:
            transport = channel.transport
            try:
                transport.read(0, spin=False)
            except PeerGone:
                if channel is self.main:
                    return False
                self.drop(channel)
                continue
            bodies = transport.take()
            if bodies and not self.answer(channel, bodies):
                return False
        return True

    def answer(self, channel: ServerChannel, bodies: list[Body]) -> bool:
        """Answer the frames that came on ``channel``; False on ``Shutdown``.

        A side channel whose client end is gone is dropped; the pipe's end stops the loop.
        """
        try:
            return self._answer(channel, bodies)
        except PeerGone:
            if channel is self.main:
                raise
            self.drop(channel)
            return True

    def _answer(self, channel: ServerChannel, bodies: list[Body]) -> bool:
        protocol = channel.protocol
        if len(bodies) == 1 and self.pool is None:  # the common case: one call, answer it now
            message = protocol.receive(bodies[0])
            if isinstance(message, _CALLS):
                frame = self.run_call(channel, message)
                if frame is not None:
                    if self.coroutines is None:  # one thread writes: no lock needed
                        channel.write(frame)
                    else:
                        channel.send(frame)
                return True
            if message is None:
                return True
            if isinstance(message, Shutdown):
                return False
            if isinstance(message, _CONTROLS):
                self.streams.control(message)
                return True
            channel.send(self.request(channel, message))
            return True
        return self._answer_all(channel, bodies)

    def _answer_all(self, channel: ServerChannel, bodies: list[Body]) -> bool:
        """``_answer`` for several frames, or with a pool: replies of calls run here are
        written together, calls the pool runs write their own."""
        protocol = channel.protocol
        out: list[Buffer] = []
        try:
            for body in bodies:
                message = protocol.receive(body)
                if message is None:
                    continue
                if isinstance(message, _CONTROLS):
                    self.streams.control(message)
                    continue
                if isinstance(message, _CALLS):
                    if self.pool is not None and not self.dispatcher.streams(message):
                        self.pool.submit(self.run_and_reply, channel, message)
                        continue
                    started = time.perf_counter()
                    frame = self.run_call(channel, message)
                    if frame is not None:
                        out += frame
                    del frame
                    if time.perf_counter() - started > _FLUSH_AFTER:
                        channel.send(out)
                        out = []
                elif isinstance(message, Shutdown):
                    return False
                else:
                    out += self.request(channel, message)
        finally:
            if out:
                channel.send(out)
        return True

    def request(
        self, channel: ServerChannel, message: Fail | Describe | OpenChannel | ChannelFrame
    ) -> list[Buffer]:
        """The reply to a frame that is not a call."""
        protocol = channel.protocol
        if isinstance(message, Fail):
            return protocol.reply(message.call_id, False, message)
        if isinstance(message, Describe):
            return protocol.reply(message.call_id, True, int(self.dispatcher.kind(message.name)))
        if channel is not self.main:
            raise ProtocolError(f"{type(message).__name__} came on a side channel")
        if isinstance(message, OpenChannel):
            return self.open_channel(message)
        return self.take_channel(message)
