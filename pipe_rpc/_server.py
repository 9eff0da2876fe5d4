"""The server loop: ``serve()``, the exposure rules, and concurrency.

One thread reads requests. With ``max_concurrency=1`` it runs each call itself,
in arrival order, and writes the replies of everything it read in one go
(fewer system calls when a client pipelines). With ``N > 1`` calls run on a
pool of N threads and each writes its own reply under its channel's lock.

Besides the pipe, the loop serves the side channels the client sends it (one
per calling thread, see ``_protocol``): it then waits on all of them at once,
and answers each call on the channel it came by, ringing the channel's
doorbell, if it has one, before each write. A side channel that reaches end
of file is dropped; the pipe's end of file ends the loop.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import Any

from ._codec import Codec
from ._coroutines import CoroutineRunner
from ._errors import MethodNotFoundError, ProtocolError, SerializationError
from ._messages import (
    Call,
    Cancel,
    Credit,
    Describe,
    Fail,
    FailKind,
    Get,
    Kind,
    OpenChannel,
    Shutdown,
)
from ._messages import Channel as ChannelFrame
from ._protocol import MAX_CHANNELS, ServerProtocol
from ._streams import Streams
from ._transport import (
    PeerGone,
    Poller,
    Transport,
    enlarge_buffers,
    is_unix_stream,
    shutdown,
)
from ._wire import Body, Buffer

#: A serial call that ran longer than this flushes replies held for batching.
_FLUSH_AFTER = 0.001
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


#: Code flags of the functions whose calls the proxy answers otherwise than with a value.
_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200


class Dispatcher:
    """Finds and runs the public methods of one service object, and reads its attributes."""

    def __init__(self, service: object) -> None:
        self.service = service
        self._methods: dict[str, Callable[..., Any]] = {}
        self._kinds: dict[str, Kind] = {}

    def lookup(self, name: str) -> Callable[..., Any]:
        """The bound method ``name``, or ``MethodNotFoundError`` having run nothing.

        A name is refused when it starts with ``_``, contains a dot, or is not a
        callable attribute; properties are refused without running their getter.
        """
        method: Callable[..., Any] | None = self._methods.get(name)
        if method is not None:
            return method
        _check_public(name)
        kind = type(self.service).__name__
        static = _static_attribute(self.service, name)
        if isinstance(static, property | staticmethod | classmethod) and not callable(
            getattr(static, "__func__", None)
        ):
            raise MethodNotFoundError(
                f"{kind}.{name} is a property, not a method: read it as proxy.{name}"
            )
        try:
            method = getattr(self.service, name)
        except AttributeError:
            raise MethodNotFoundError(f"{kind} has no method {name!r}") from None
        if not callable(method):
            raise MethodNotFoundError(f"{kind}.{name} is not callable: read it as proxy.{name}")
        self._methods[name] = method
        return method

    def kind(self, name: str) -> Kind:
        """What the public name ``name`` is, found without running a getter."""
        if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
            return Kind.UNKNOWN
        static = _static_attribute(self.service, name)
        if isinstance(static, property):
            return Kind.PROPERTY
        if static is MISSING and not hasattr(type(self.service), "__getattr__"):
            return Kind.UNKNOWN
        try:
            value = getattr(self.service, name) if static is MISSING else static
        except AttributeError:
            return Kind.UNKNOWN
        if not callable(value):
            return Kind.ATTRIBUTE
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        flags = getattr(code, "co_flags", 0)
        if flags & _CO_COROUTINE:
            return Kind.ASYNC
        if flags & _CO_ASYNC_GENERATOR:
            return Kind.ASYNC_GENERATOR
        if flags & _CO_GENERATOR:
            return Kind.GENERATOR
        return Kind.METHOD

    def streams(self, call: Call | Get) -> bool:
        """Does ``call`` open a stream (a generator method)? Such calls run on the loop's
        thread, which advances every stream."""
        if type(call) is not Call:
            return False
        kind = self._kinds.get(call.method)
        if kind is None:
            kind = self._kinds[call.method] = self.kind(call.method)
        return kind in (Kind.GENERATOR, Kind.ASYNC_GENERATOR)

    def kinds(self) -> dict[str, Kind]:
        """The kind of every public name of the service, for the server's hello."""
        names = {n for n in dir(self.service) if not n.startswith("_")}
        table = {name: self.kind(name) for name in sorted(names)}
        return {name: kind for name, kind in table.items() if kind is not Kind.UNKNOWN}

    def run(self, call: Call | Get) -> tuple[bool, Any]:
        """Run one call, or read one attribute: ``(True, result)``, ``(False, exception)``
        or ``(False, Fail)``."""
        if not isinstance(call, Call):
            return self.read(call)
        method = self._methods.get(call.method)
        if method is None:
            try:
                method = self.lookup(call.method)
            except MethodNotFoundError as exc:
                return False, Fail(call.call_id, FailKind.METHOD_NOT_FOUND, str(exc))
        try:
            return True, method(*call.args, **call.kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt go back to the caller too
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
                # Drop this frame from the remote traceback. Not through a local: this
                # frame holding the traceback that holds this frame would be a cycle.
                exc.__traceback__ = exc.__traceback__.tb_next
            return False, exc

    def read(self, get: Get) -> tuple[bool, Any]:
        """The value of a public property or data attribute (its getter runs here)."""
        kind = self.kind(get.name)
        if kind not in (Kind.PROPERTY, Kind.ATTRIBUTE):
            what = "not a public name" if kind is Kind.UNKNOWN else "a method"
            message = f"{type(self.service).__name__}.{get.name} is {what}; only public "
            message += "properties and data attributes can be read"
            return False, Fail(get.call_id, FailKind.METHOD_NOT_FOUND, message)
        try:
            return True, getattr(self.service, get.name)
        except BaseException as exc:
            return False, exc


def _check_public(name: object) -> None:
    """Raise ``MethodNotFoundError`` unless ``name`` may name a public method."""
    if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
        raise MethodNotFoundError(
            f"{name!r} is not served: only public methods of the service can be called "
            "(no leading underscore, no dots)"
        )


#: Frames that run service code, and a stream consumer's frames. (Tuples: an ``X | Y``
#: in ``isinstance`` builds a union object on every call.)
_CALLS = (Call, Get)
_CONTROLS = (Credit, Cancel)
#: Results whose pickling runs no code of their own, and that are never sent out of band.
_PLAIN = frozenset({int, float, bool, type(None), str})

#: What ``_static_attribute`` returns for a name it did not find.
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


def reply(protocol: ServerProtocol, call: Call | Get, ok: bool, value: Any) -> list[Buffer]:
    """The frame answering ``call``; a result or exception that fails to pickle in any
    way is a serialization failure of this call alone.

    Pickling runs the value's own code (``__reduce__``), which may raise any
    ``BaseException``; the encoder turns an ``Exception`` into a ``Fail``
    already. Only ``KeyboardInterrupt`` ends the server.
    """
    codec = protocol.codec
    method = call.method if type(call) is Call else call.name  # type: ignore[union-attr]
    try:
        if codec.by_reference is not None and not isinstance(value, Fail):
            return codec.encode_reply_by_reference(call.call_id, ok, value, method)
        return protocol.reply(call.call_id, ok, value, method)
    except SerializationError as exc:
        return codec.encode(Fail(call.call_id, FailKind.SERIALIZATION, str(exc)))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        what = "result" if ok else "exception"
        message = f"the {what} of {method}() could not be pickled: {exc!r}"
        return protocol.codec.encode(Fail(call.call_id, FailKind.SERIALIZATION, message))


def forget(error: object) -> None:
    """Let go of what a raised ``error`` keeps alive, once its reply is encoded (a
    result is left alone, even an exception: the service may still use it).

    Its traceback holds the frames of the call, and they hold its locals (a big
    buffer, say) until the cyclic collector runs if there is a cycle among them,
    which there often is (a frame holding the exception it caught). Clearing the
    frames' locals and unlinking the tracebacks, also of the exceptions chained
    to it or grouped in it, frees them at once. A service that keeps the exception
    it raised keeps it without its traceback.
    """
    if not isinstance(error, BaseException):
        return
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        linked = (exc.__cause__, exc.__context__)
        exc.__cause__ = exc.__context__ = None
        pending.extend(e for e in linked if e is not None)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)


def _static_attribute(obj: object, name: str) -> object:
    """``obj.name`` as stored, without running a descriptor (``MISSING`` if not found).

    The instance's ``__dict__`` first, then the classes of its MRO, as attribute
    look-up goes for anything that is not a data descriptor. A cheap stand-in for
    ``inspect.getattr_static``: importing ``inspect`` would cost a child's first
    call more than 10 ms.
    """
    try:
        instance_dict = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        instance_dict = {}
    for klass in type(obj).__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            if isinstance(found, property) or name not in instance_dict:
                return found
            break
    return instance_dict.get(name, MISSING)


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


class _Channel:
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


class _Loop:
    def __init__(
        self, service: object, conn: Connection, max_concurrency: int, codec: Codec
    ) -> None:
        self.dispatcher = Dispatcher(service)
        self.main = _Channel(conn, ServerProtocol(codec, kinds=self.dispatcher.kinds()))
        enlarge_buffers(conn)
        self.side: dict[int, _Channel] = {}  # by descriptor
        self.poller: Poller | None = None  # once there are side channels
        self.takes_channels = is_unix_stream(conn)
        # Channels granted whose descriptor has not come yet. A grant whose Channel frame
        # never comes (the client gave up) only leaves the pipe read with recvmsg.
        self.awaited = 0
        self.pool = None
        self.max_concurrency = max_concurrency
        self.plain = codec.by_reference is None  # a plain result is encoded as it is
        #: Runs the coroutines of ``async def`` methods, from the first such call on.
        self.coroutines: CoroutineRunner | None = None
        #: The open streams of generator methods, advanced between other work.
        self.streams = Streams(_send_locked)
        if max_concurrency > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="pipe_rpc-call")

    def run(self) -> None:
        try:
            self.main.send(self.main.protocol.greeting())
            while self.step():
                pass
        except PeerGone:
            pass
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            if self.coroutines is not None:
                self.coroutines.stop()
            self.streams.close_all()
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

    def answer(self, channel: _Channel, bodies: list[Body]) -> bool:
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

    def _answer(self, channel: _Channel, bodies: list[Body]) -> bool:
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

    def run_call(self, channel: _Channel, call: Call | Get) -> list[Buffer] | None:
        """Run ``call`` and return its reply, or ``None`` if it goes on as a coroutine
        (an ``async def`` method), whose reply the coroutine runner sends."""
        ok, value = self.dispatcher.run(call)
        if ok and type(value) in _PLAIN and self.plain:  # its pickling runs no code of its own
            return channel.protocol.codec.encode_return(call.call_id, value)
        if ok and type(value) in (GeneratorType, AsyncGeneratorType):
            assert type(call) is Call
            if type(value) is AsyncGeneratorType:
                value = self._coroutine_runner().steps(value)
            self.streams.start(channel, call, value)
            return None
        if ok and type(value) is CoroutineType:
            self._coroutine_runner().start(channel, call, value)
            return None
        try:
            return reply(channel.protocol, call, ok, value)
        finally:
            if not ok:
                forget(value)

    def request(
        self, channel: _Channel, message: Fail | Describe | OpenChannel | ChannelFrame
    ) -> list[Buffer]:
        """The reply to a frame that is not a call."""
        protocol = channel.protocol
        if isinstance(message, Fail):
            return protocol.reply(message.call_id, False, message)
        if isinstance(message, Describe):
            return protocol.reply(message.call_id, True, int(self.dispatcher.kind(message.name)))
        if channel is not self.main:
            raise ProtocolError(f"{type(message).__name__} came on a side channel")
        transport = self.main.transport
        if isinstance(message, OpenChannel):
            if not self.takes_channels:
                return self.refuse(message.call_id, "the pipe cannot pass descriptors")
            if len(self.side) >= _MOST_CHANNELS:
                return self.refuse(message.call_id, f"{_MOST_CHANNELS} side channels are open")
            self.awaited += 1
            if transport.fds is None:
                transport.fds = []
            return protocol.reply(message.call_id, True, None)
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
        side = _Channel(sock, ServerProtocol(protocol.codec, peer=protocol.peer), doorbell)
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

    def drop(self, channel: _Channel) -> None:
        """Stop serving a side channel (its client thread is gone)."""
        assert self.poller is not None
        self.poller.remove(channel.transport)
        del self.side[channel.transport.fd]
        channel.close()
        if not self.side:
            self.poller = None

    def _coroutine_runner(self) -> CoroutineRunner:
        if self.coroutines is None:
            self.coroutines = CoroutineRunner(self.max_concurrency, _send_reply)
        return self.coroutines

    def run_and_reply(self, channel: _Channel, call: Call | Get) -> None:
        frame = self.run_call(channel, call)
        if frame is not None:
            try:
                channel.send(frame)
            except PeerGone:
                pass


def _send_locked(channel: _Channel, frame: list[Buffer]) -> None:
    try:
        channel.send(frame)
    except PeerGone:
        pass


def _send_reply(channel: _Channel, call: Call | Get, ok: bool, value: Any) -> None:
    """Send the reply of a call that ran as a coroutine (from the runner's thread)."""
    try:
        frame = reply(channel.protocol, call, ok, value)
    finally:
        if not ok:
            forget(value)
    del value
    try:
        channel.send(frame)
    except PeerGone:
        pass
