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

Interrupts. The table is made so that delivering a reply twice is harmless:
``receive`` settles a call's slot first and takes it out of the table after,
so an exception landing in between leaves the reply to be delivered again
(the slot's ``settle`` is idempotent), never a call that waits for ever. A
reply for a call id that was never sent is a ``ProtocolError``; one for a call
that was abandoned, or already answered, is dropped and counted.

Frames are cut from the stream by ``_wire.FrameReader``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ._codec import CALL, RETURN, Codec, hello
from ._decoding import UndecodablePayload
from ._errors import MethodNotFoundError, ProtocolError, SerializationError
from ._messages import (
    Call,
    Cancel,
    Channel,
    Credit,
    Describe,
    Fail,
    FailKind,
    Get,
    Hello,
    Items,
    Kind,
    Message,
    OpenChannel,
    Raise,
    Return,
    Shutdown,
    StartupFailed,
)
from ._wire import BODY_HEAD, BODY_HEAD_SIZE, Body, Buffer

#: How many side channels (one per calling thread) a client opens at most.
MAX_CHANNELS = 32


class Slot(Protocol):
    """Where a call's outcome goes: the I/O layer's record of one call."""

    def settle(self, ok: bool, value: Any) -> None:
        """Take the outcome (a second one for the same call is ignored) and wake the owner."""


S = TypeVar("S", bound=Slot)

#: ``quick_result``: the body is not the plain return value of the call asked about.
NOT_QUICK: Any = object()


class ClientProtocol(Generic[S]):
    """The client end: numbers calls, matches replies to their slots, drops late ones.

    The table and the id counter are guarded by a lock of their own, so any
    thread may start, receive or abandon.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.peer: Hello | None = None
        self.late_replies = 0
        self._pending: dict[int, S] = {}
        #: The same table, for reading only: ``len(protocol.pending)`` is ``pending_count``
        #: without a call, for the connection's hot paths.
        self.pending: Mapping[int, S] = self._pending
        self._ids = itertools.count(1)  # ``next()`` on it is one C call: no lock
        self._lock = threading.Lock()

    def greeting(self) -> list[Buffer]:
        """The frame to send before anything else."""
        return self.codec.encode(hello())

    @property
    def pending_count(self) -> int:
        """How many calls wait for a reply."""
        return len(self._pending)

    def slots(self) -> list[S]:
        """The slots of the calls waiting for a reply, oldest first."""
        with self._lock:
            return list(self._pending.values())

    def start(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], slot: S
    ) -> tuple[int, list[Buffer]]:
        """Register a call for ``slot``; return its id and frame.

        Raises:
            SerializationError: an argument would not pickle; nothing was registered.
        """
        call_id, frame = self.start_call(method, args, kwargs)
        self._pending[call_id] = slot  # no call from here to the caller's store of the id
        return call_id, frame

    def start_call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, list[Buffer]]:
        """A call's id and frame, not registered: for a caller that reads its own reply
        (``quick_result``) and registers (``register``) only if it is not the common kind.
        Unregistered, the call is as good as abandoned: its reply is dropped as late.

        Raises:
            SerializationError: an argument would not pickle.
        """
        call_id = next(self._ids)
        return call_id, self.codec.encode_call(call_id, method, args, kwargs)

    def register(self, call_id: int, slot: S) -> None:
        """Make ``start_call``'s call pending: ``receive`` gives its outcome to ``slot``."""
        self._pending[call_id] = slot

    def quick_result(self, body: Body, call_id: int) -> Any:
        """The value in ``body`` if it is call ``call_id``'s plain return, else ``NOT_QUICK``.

        Anything else (a raise, a failure, a value that will not unpickle, another
        call's reply) must then go to ``receive``, the call registered first.

        Raises:
            ProtocolError: an untrusted peer sent something not allowed.
        """
        if len(body) > BODY_HEAD_SIZE and self.peer is not None:
            tag, got_id = BODY_HEAD.unpack_from(body)
            if tag == RETURN and got_id == call_id:
                try:
                    return self.codec.loads(call_id, memoryview(body)[BODY_HEAD_SIZE:], "result")
                except UndecodablePayload:
                    pass
        return NOT_QUICK

    def request(
        self, make: Callable[[int], OpenChannel | Channel | Get | Describe], slot: S
    ) -> tuple[int, list[Buffer]]:
        """Register a request to the server machinery itself (``make(call_id)``); return
        its id and frame."""
        call_id = self._next_id()
        self._pending[call_id] = slot
        try:
            return call_id, self.codec.encode(make(call_id))
        except BaseException:
            self.abandon(call_id)
            raise

    def _next_id(self) -> int:
        return next(self._ids)

    def _made(self, call_id: int) -> bool:
        """Was a call with this id made (its id given out)?"""
        given = int(repr(self._ids)[6:-1]) - 1  # "count(8)": ids up to 7 were given
        return 0 < call_id <= given

    def abandon(self, call_id: int) -> bool:
        """Give up on a call; False if it had an outcome already (or was abandoned)."""
        with self._lock:
            return self._pending.pop(call_id, None) is not None

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """Settle every pending call with a fresh ``error()``, then forget it."""
        with self._lock:
            pending = list(self._pending.items())
        for call_id, slot in pending:
            slot.settle(False, error())
            self.abandon(call_id)

    def receive(self, body: Body) -> None:
        """Take one frame body and settle the call it answers.

        Raises:
            ProtocolError: the peer broke the protocol; the connection is dead.
            StartupFailedSignal: the first message says the child's factory failed.
        """
        if len(body) > BODY_HEAD_SIZE and self.peer is not None:
            tag, call_id = BODY_HEAD.unpack_from(body)
            if tag == RETURN:  # the hot path: a plain return value
                try:
                    value = self.codec.loads(call_id, memoryview(body)[BODY_HEAD_SIZE:], "result")
                except UndecodablePayload as exc:
                    self._settle(call_id, False, SerializationError(exc.message))
                    return
                slot = self._pending.get(call_id)
                if slot is None:  # late, or never made
                    self._settle(call_id, True, value)
                    return
                slot.settle(True, value)  # ``_settle``, written out
                with self._lock:
                    self._pending.pop(call_id, None)
                return
        try:
            message = self.codec.decode(body)
        except UndecodablePayload as exc:
            self._settle(exc.call_id, False, SerializationError(exc.message))
            return
        if self.peer is None or isinstance(message, Hello):
            self._first(message)
        elif isinstance(message, Items):
            self._feed(message)
        elif isinstance(message, Return):
            self._settle(message.call_id, True, message.value)
        elif isinstance(message, Raise):
            self._settle(message.call_id, False, message.error)
        elif isinstance(message, Fail):
            self._settle(message.call_id, False, fail_error(message))
        else:
            raise ProtocolError(f"a client does not accept {type(message).__name__} messages")

    def _settle(self, call_id: int, ok: bool, value: Any) -> None:
        slot = self._pending.get(call_id)
        if slot is None:
            if not self._made(call_id):
                raise ProtocolError(f"the peer replied to call {call_id}, which was never made")
            self.late_replies += 1
            return
        slot.settle(ok, value)
        with self._lock:  # after the outcome: an interrupt before this line leaves a repeat
            self._pending.pop(call_id, None)

    def _feed(self, message: Items) -> None:
        """Items of a stream: its slot takes them and stays in the table."""
        slot = self._pending.get(message.call_id)
        if slot is None:
            self._settle(message.call_id, True, None)  # late, or never made
            return
        feed = getattr(slot, "feed", None)
        if feed is None:
            raise ProtocolError(f"the peer streamed items for call {message.call_id}, not a stream")
        feed(message.seq, message.items)

    def _first(self, message: Message) -> None:
        if isinstance(message, Hello):
            if self.peer is not None and message != self.peer:
                raise ProtocolError("a second hello from the peer")
            self.peer = message
            return
        if isinstance(message, StartupFailed):
            raise StartupFailedSignal(message)
        raise ProtocolError(f"expected the peer's hello first, got {type(message).__name__}")


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

    def __init__(
        self,
        codec: Codec | None = None,
        peer: Hello | None = None,
        kinds: dict[str, Kind] | None = None,
    ) -> None:
        self.codec = codec or Codec()
        self.peer = peer
        self.kinds = kinds

    def greeting(self) -> list[Buffer]:
        """The frame to send before anything else: the hello, with the service's names."""
        return self.codec.encode(hello(self.kinds))

    def receive(
        self, body: Body
    ) -> Call | Get | Describe | Credit | Cancel | Shutdown | Fail | OpenChannel | Channel | None:
        """Take one frame body: a call to run, a request, a ``Fail`` to send back, or nothing.

        Raises:
            ProtocolError: the peer broke the protocol; stop serving.
        """
        if len(body) > BODY_HEAD_SIZE and self.peer is not None:
            tag, call_id = BODY_HEAD.unpack_from(body)
            if tag == CALL:  # the hot path: a call with its arguments in band
                try:
                    payload = memoryview(body)[BODY_HEAD_SIZE:]
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
        if isinstance(message, Call | Get | Describe | Credit | Cancel | Shutdown):
            return message
        if isinstance(message, OpenChannel | Channel):
            return message
        raise ProtocolError(f"a server does not accept {type(message).__name__} messages")

    def reply(self, call_id: int, ok: bool, value: Any, method: str = "") -> list[Buffer]:
        """The frame answering ``call_id`` (a call of ``method``): its result, or the
        exception it raised.

        A result that will not pickle becomes a ``Fail`` naming why.
        """
        if ok:
            try:
                return self.codec.encode_return(call_id, value, method)
            except SerializationError as exc:
                return self.codec.encode(Fail(call_id, FailKind.SERIALIZATION, str(exc)))
        if isinstance(value, Fail):
            return self.codec.encode(value)
        return self.codec.encode(Raise(call_id, value))
