"""The protocol as plain state machines: bytes in, messages and frames out, no I/O.

Theory of operation
-------------------

Two ends share one duplex byte stream. Each end first sends a ``Hello``
(magic, protocol version, pid); the first frame each end receives must be the
peer's hello, or the peer is not speaking this protocol and the connection is
dead (``ProtocolError``).

The client numbers its calls (``call_id`` 1, 2, 3, ...) and keeps a table of
pending calls: call id -> an opaque *slot* given by the I/O layer. A reply
(``Return``, ``Raise`` or ``Fail``) is matched to its slot by id and the slot
leaves the table. A call that gives up (timeout) is *abandoned*: it leaves the
table, so its late reply finds no slot and is dropped and counted, never
handed to another call. Deadlines themselves live with the waiting caller;
the table only knows which ids may still be answered.

The server answers each ``Call`` with exactly one reply carrying its id, in
any order. A payload that will not unpickle fails its own call
(``UndecodablePayload`` -> ``Fail``), never the connection; a frame that is
not a frame at all, an unknown tag or a reply to an id never sent breaks the
connection (``ProtocolError``).

Side channels. Threads that call at the same time each get a connection of
their own, so that the kernel wakes each caller when its reply comes, with no
thread in between. A thread asks on the pipe (``OpenChannel``, with a call id
like any call); the server answers once it reads the pipe in a way that keeps
passed descriptors (``recvmsg``), and the client then sends one end of a new
socket pair with a ``Channel`` frame (``SCM_RIGHTS``), which the server
answers once it serves that socket. A side channel carries calls and replies
exactly as the pipe does, with no hello of its own; call ids stay unique
across all of a client's channels. The pipe alone carries the hellos, the
requests for channels and ``Shutdown``.

A side channel may have a *doorbell*: an eventfd sent with the socket in the
same frame (``Channel(doorbell=True)``), which the server rings before each
write to that socket and when it closes it. A caller with no deadline sleeps
on the doorbell, then reads its socket. Linux wakes a socket's reader on the
writer's CPU when it can (a "sync" wake-up), so a caller woken by its socket
often lands on the server's CPU and preempts it; an eventfd wakes it where
the scheduler finds room, most often on a CPU of its own. The ring comes
before the write because a reply larger than the socket's buffer is written
only as the caller reads it. The doorbell is a hint of when to read, never
what: replies are only ever read from the socket, and a caller sleeps on the
doorbell at most once per call (the ring it took may have been for a reply
still being written), so a ring left over costs a sleep in ``read``, nothing
more. A doorbell does not report a dead server process, so the client gives
one only where it watches the server's process, and rings it itself when the
process ends or the client breaks.

A thread alone on its side channel, with no deadline, may skip the table:
``start_call`` gives the id and frame, and ``quick_result`` decodes the first
frame read if it is that call's plain return, the common case. Anything else
(a raise, a failure, a frame read in parts) goes to ``receive`` once the call
is registered, so it is matched as any other reply.

``FrameReader`` cuts the stream into frame bodies. Large frames are read in
place: once their length is known, ``read_target()`` hands the I/O layer the
rest of a buffer of exactly that size to read into, so big payloads are not
copied chunk by chunk.
"""

from __future__ import annotations

import itertools
import mmap
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ._codec import CALL, RETURN, Body, Buffer, Codec, UndecodablePayload, hello
from ._errors import MethodNotFoundError, ProtocolError, SerializationError
from ._messages import (
    Call,
    Channel,
    Fail,
    FailKind,
    Hello,
    Message,
    OpenChannel,
    Raise,
    Return,
    Shutdown,
    StartupFailed,
)

S = TypeVar("S")

_BODY = struct.Struct("!BQ")
_LENGTH = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: A frame at least this large is read in place into a buffer of its own.
BIG_FRAME = 1 << 20
#: A big frame's buffer up to this size is kept, and reused once nothing refers to it.
SPARE_MAX = 4 << 20
#: How many side channels (one per calling thread) a client opens at most.
MAX_CHANNELS = 32


class _NotQuick:
    def __repr__(self) -> str:
        return "NOT_QUICK"


#: What ``quick_result`` returns for a frame that is not the plain return it looked for.
NOT_QUICK: Any = _NotQuick()


class FrameTooLargeError(ProtocolError):
    """A frame's length is over the bound the reader was given."""


class FrameReader:
    """Cuts a stream of bytes (as ``Connection.send_bytes`` frames it) into frame bodies.

    Args:
        max_frame: refuse any frame whose body is longer (``None``: no bound).
    """

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        self._rest = b""  # bytes of an unfinished small frame
        self._big: mmap.mmap | None = None  # body of a large frame being read in place
        self._big_filled = 0
        self._big_size = 0
        self._spare: mmap.mmap | None = None  # the last buffer of at most SPARE_MAX bytes

    def read_target(self) -> memoryview | None:
        """Where to read the next bytes directly, or ``None`` to ``feed()`` what you read."""
        if self._big is None:
            return None
        return memoryview(self._big)[self._big_filled : self._big_size]

    def filled(self, count: int) -> list[Body]:
        """``count`` bytes were read into ``read_target()``; return the frames now complete."""
        assert self._big is not None
        self._big_filled += count
        if self._big_filled < self._big_size:
            return []
        body = memoryview(self._big)[: self._big_size]
        self._big, self._big_filled = None, 0
        return [body]

    def feed(self, data: bytes) -> list[Body]:
        """Take bytes read from the stream; return the frame bodies now complete."""
        if not self._rest and len(data) > 4:  # the hot path: exactly one whole frame
            (size,) = _LENGTH.unpack_from(data)
            if size == len(data) - 4 and (self.max_frame is None or size <= self.max_frame):
                return [memoryview(data)[4:]]
        if self._rest:
            data = self._rest + data
            self._rest = b""
        frames: list[Body] = []
        pos, end = 0, len(data)
        while end - pos >= 4:
            (size,) = _LENGTH.unpack_from(data, pos)
            head = 4
            if size < 0:
                if size != -1:
                    raise ProtocolError(f"frame length {size} is negative")
                if end - pos < 12:
                    break
                (size,) = _LONG.unpack_from(data, pos + 4)
                head = 12
            if self.max_frame is not None and size > self.max_frame:
                raise FrameTooLargeError(
                    f"frame of {size} bytes is over the bound of {self.max_frame} bytes"
                )
            start = pos + head
            if end - start >= size:
                frames.append(memoryview(data)[start : start + size])
                pos = start + size
                continue
            if size >= BIG_FRAME and end > start:
                self._big = self._buffer_for(size)
                self._big_size = size
                have = end - start
                self._big[:have] = memoryview(data)[start:end]
                self._big_filled = have
                return frames
            break
        if pos < end:
            self._rest = data[pos:]
        return frames

    def _buffer_for(self, size: int) -> mmap.mmap:
        """A buffer for a big frame: the spare if nothing refers to it any more, else a new one.

        New buffers are anonymous private memory: the kernel hands out zeroed pages as
        the read fills them, where ``bytearray(size)`` would zero every page first. A
        decoded object (a numpy array read in place) may keep a buffer alive; the spare
        is reused only when its reference count shows that nothing but this reader holds
        it. A buffer over ``SPARE_MAX`` is never kept, so a huge reply leaves nothing
        behind once its objects are gone.
        """
        if self._spare is not None and len(self._spare) >= size and _holders(self) == _FREE:
            return self._spare
        try:
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        except (OSError, OverflowError, MemoryError) as exc:
            raise FrameTooLargeError(f"frame of {size} bytes cannot be allocated: {exc}") from exc
        if size <= SPARE_MAX:
            self._spare = buffer
        return buffer

    @property
    def idle(self) -> bool:
        """No partial frame is buffered."""
        return not self._rest and self._big is None


def _holders(reader: FrameReader) -> int:
    """The reference count of the reader's spare, always taken the same way.

    How many references the count includes (the attribute, a local name, the
    argument) is the interpreter's business and differs between versions, so
    it is compared with ``_FREE``, taken the same way from a spare nothing else holds.
    """
    spare = reader._spare
    return sys.getrefcount(spare)


def _free_holders() -> int:
    reader = FrameReader()
    reader._spare = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    return _holders(reader)


#: What ``_holders`` reads for a spare held by its reader alone.
_FREE = _free_holders()


class ClientProtocol(Generic[S]):
    """The client end: numbers calls, matches replies to their slots, drops late ones."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.pending: dict[int, S] = {}
        self.peer: Hello | None = None
        self.late_replies = 0
        self._ids: Iterator[int] = itertools.count(1)

    def greeting(self) -> list[Buffer]:
        """The frame to send before anything else."""
        return self.codec.encode(hello())

    def send_call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], slot: S
    ) -> tuple[int, list[Buffer]]:
        """Register a call and return its id and frame.

        Raises:
            SerializationError: an argument would not pickle; nothing was registered.
        """
        call_id, frame = self.start_call(method, args, kwargs)
        self.pending[call_id] = slot
        return call_id, frame

    def start_call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, list[Buffer]]:
        """A call's id and frame, not yet registered: for a caller that reads its own
        reply (``quick_result``) and registers only if that reply is not the common kind.

        Raises:
            SerializationError: an argument would not pickle.
        """
        call_id = next(self._ids)
        return call_id, self.codec.encode_call(call_id, method, args, kwargs)

    def register(self, call_id: int, slot: S) -> None:
        """Make ``start_call``'s call pending: ``receive`` gives its outcome to ``slot``."""
        self.pending[call_id] = slot

    def quick_result(self, body: Body, call_id: int) -> Any:
        """The value in ``body`` if it is call ``call_id``'s plain return, else ``NOT_QUICK``.

        For a caller alone on its connection with a call not registered: anything
        else (a raise, a failure, a value that will not unpickle, another call's
        reply) must then go to ``receive`` with the call registered.

        Raises:
            ProtocolError: an untrusted peer sent something not allowed.
        """
        if len(body) > 9 and self.peer is not None:
            tag, got_id = _BODY.unpack_from(body)
            if tag == RETURN and got_id == call_id:
                try:
                    return self.codec.loads(call_id, memoryview(body)[9:], "result")
                except UndecodablePayload:
                    pass
        return NOT_QUICK

    def send_request(
        self, make: Callable[[int], OpenChannel | Channel], slot: S
    ) -> tuple[int, list[Buffer]]:
        """Register a request to the server machinery itself (``make(call_id)``); return
        its id and frame."""
        call_id = next(self._ids)
        frame = self.codec.encode(make(call_id))
        self.pending[call_id] = slot
        return call_id, frame

    def abandon(self, call_id: int) -> bool:
        """Give up on a call; False if its reply was already taken (it has an outcome)."""
        return self.pending.pop(call_id, None) is not None

    def receive(self, body: Body) -> tuple[S, bool, Any] | None:
        """Take one frame body; return ``(slot, ok, value_or_error)`` for a reply, else None.

        Raises:
            ProtocolError: the peer broke the protocol; the connection is dead.
            StartupFailedSignal: the first message says the child's factory failed.
        """
        if len(body) > 9 and self.peer is not None:
            tag, call_id = _BODY.unpack_from(body)
            if tag == RETURN:  # the hot path: a plain return value
                try:
                    value = self.codec.loads(call_id, memoryview(body)[9:], "result")
                except UndecodablePayload as exc:
                    slot = self._take(call_id)
                    return None if slot is None else (slot, False, SerializationError(exc.message))
                slot = self.pending.pop(call_id, None)  # _take(), inlined on the hot path
                if slot is None:
                    self.late_replies += 1
                    return None
                return slot, True, value
        try:
            message = self.codec.decode(body)
        except UndecodablePayload as exc:
            slot = self._take(exc.call_id)
            if slot is None:
                return None
            return slot, False, SerializationError(exc.message)
        if self.peer is None:
            self._first(message)
            return None
        if isinstance(message, Return):
            slot = self._take(message.call_id)
            return None if slot is None else (slot, True, message.value)
        if isinstance(message, Raise):
            slot = self._take(message.call_id)
            return None if slot is None else (slot, False, message.error)
        if isinstance(message, Fail):
            slot = self._take(message.call_id)
            return None if slot is None else (slot, False, fail_error(message))
        raise ProtocolError(f"a client does not accept {type(message).__name__} messages")

    def _first(self, message: Message) -> None:
        if isinstance(message, Hello):
            self.peer = message
            return
        if isinstance(message, StartupFailed):
            raise StartupFailedSignal(message)
        raise ProtocolError(f"expected the peer's hello first, got {type(message).__name__}")

    def _take(self, call_id: int) -> S | None:
        slot = self.pending.pop(call_id, None)
        if slot is None:
            self.late_replies += 1
        return slot


class StartupFailedSignal(Exception):
    """Raised by the client protocol when the child says its factory failed."""

    def __init__(self, message: StartupFailed) -> None:
        super().__init__(message)
        self.message = message


def fail_error(message: Fail) -> Exception:
    """The caller's exception for a ``Fail`` reply."""
    if message.kind == FailKind.METHOD_NOT_FOUND:
        return MethodNotFoundError(message.message)
    if message.kind == FailKind.NO_CHANNEL:
        return ProtocolError(message.message)
    return SerializationError(message.message)


class ServerProtocol:
    """The server end: checks the client's hello, decodes calls, encodes replies.

    Args:
        codec: shared with the other channels of the same client.
        peer: the client's hello, for a side channel (its hello came on the pipe).
    """

    def __init__(self, codec: Codec | None = None, peer: Hello | None = None) -> None:
        self.codec = codec or Codec()
        self.peer = peer

    def greeting(self) -> list[Buffer]:
        """The frame to send before anything else."""
        return self.codec.encode(hello())

    def receive(self, body: Body) -> Call | Shutdown | Fail | OpenChannel | Channel | None:
        """Take one frame body: a call to run, a request, a ``Fail`` to send back, or nothing.

        Raises:
            ProtocolError: the peer broke the protocol; stop serving.
        """
        if len(body) > 9 and self.peer is not None:
            tag, call_id = _BODY.unpack_from(body)
            if tag == CALL:  # the hot path: a call with its arguments in band
                try:
                    payload = memoryview(body)[9:]
                    method, args, kwargs = self.codec.loads(call_id, payload, "arguments")
                except UndecodablePayload as exc:
                    return Fail(call_id, FailKind.SERIALIZATION, exc.message)
                except (TypeError, ValueError) as exc:
                    raise ProtocolError(f"malformed call payload: {exc}") from exc
                return Call(call_id, method, args, kwargs)
        try:
            message = self.codec.decode(body)
        except UndecodablePayload as exc:
            return Fail(exc.call_id, FailKind.SERIALIZATION, exc.message)
        if self.peer is None:
            if not isinstance(message, Hello):
                raise ProtocolError(
                    f"expected the peer's hello first, got {type(message).__name__}"
                )
            self.peer = message
            return None
        if isinstance(message, Call | Shutdown | OpenChannel | Channel):
            return message
        raise ProtocolError(f"a server does not accept {type(message).__name__} messages")

    def reply(self, call_id: int, ok: bool, value: Any) -> list[Buffer]:
        """The frame answering ``call_id``: its result, or the exception it raised.

        A result that will not pickle becomes a ``Fail`` naming why.
        """
        if ok:
            try:
                return self.codec.encode_return(call_id, value)
            except SerializationError as exc:
                return self.codec.encode(Fail(call_id, FailKind.SERIALIZATION, str(exc)))
        if isinstance(value, Fail):
            return self.codec.encode(value)
        return self.codec.encode(Raise(call_id, value))
