"""The messages that cross the pipe, as plain records.

Every frame on the wire is ``length | tag | call id | payload`` (see ``_codec``);
these records are what the two ends see once a frame is decoded. They carry no
behaviour: ``_protocol`` decides what a message means, ``_codec`` how it looks.
"""

from __future__ import annotations

import enum
from typing import Any

#: Bumped whenever the frame layout or a payload shape changes.
PROTOCOL_VERSION = 5

#: The first bytes of every hello payload, so a peer that is not pipe_rpc is spotted at once.
HELLO_MAGIC = b"pipe_rpc"


class Tag(enum.IntEnum):
    """The one-byte kind of a frame."""

    HELLO = 1
    CALL = 2
    RETURN = 3
    RAISE = 4
    FAIL = 5
    STARTUP_FAILED = 6
    SHUTDOWN = 7
    OPEN_CHANNEL = 8
    CHANNEL = 9
    GET = 10
    DESCRIBE = 11
    ITEMS = 12
    CREDIT = 13
    CANCEL = 14


class Kind(enum.IntEnum):
    """What a public name of the service is, as the server's hello tells the client.

    The proxy answers each kind as its type says: a method returns its value, an
    ``async def`` method an awaitable, a generator method an iterator, an async
    generator method an async iterator; reading a property or a data attribute
    fetches its value.
    """

    UNKNOWN = 0  # no such public name (yet)
    METHOD = 1
    ASYNC = 2
    GENERATOR = 3
    ASYNC_GENERATOR = 4
    PROPERTY = 5
    ATTRIBUTE = 6


class FailKind(enum.IntEnum):
    """Why the server machinery (not the service) failed a call."""

    METHOD_NOT_FOUND = 1
    SERIALIZATION = 2
    NO_CHANNEL = 3


class _Record:
    """A small immutable-by-convention record: equality, hash and repr from its fields.

    Plain classes rather than attrs: the child imports this module on every
    start, and building attrs classes costs milliseconds there.
    """

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hello(_Record):
    """The first message each end sends: who speaks, and which protocol version.

    A server's hello also lists the kind of each public name of its service.
    """

    __slots__ = ("version", "pid", "kinds")  # noqa: RUF023 (the order of the fields)

    def __init__(self, version: int, pid: int, kinds: dict[str, Kind] | None = None) -> None:
        self.version = version
        self.pid = pid
        self.kinds = kinds or {}


class Call(_Record):
    """Run ``method(*args, **kwargs)`` on the service and reply with ``call_id``."""

    __slots__ = ("call_id", "method", "args", "kwargs")  # noqa: RUF023

    def __init__(
        self, call_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.args = args
        self.kwargs = kwargs


class Return(_Record):
    """The method returned ``value``."""

    __slots__ = ("call_id", "value")

    def __init__(self, call_id: int, value: Any) -> None:
        self.call_id = call_id
        self.value = value


class Raise(_Record):
    """The method raised ``error``.

    In the server this is the live exception; in the client it is the rebuilt
    one, its ``__cause__`` a ``RemoteTraceback`` (or a ``RemoteError`` when it
    could not be rebuilt).
    """

    __slots__ = ("call_id", "error")

    def __init__(self, call_id: int, error: BaseException) -> None:
        self.call_id = call_id
        self.error = error


class Fail(_Record):
    """The server could not run the call or send its result; nothing of the service's raised."""

    __slots__ = ("call_id", "kind", "message")

    def __init__(self, call_id: int, kind: FailKind, message: str) -> None:
        self.call_id = call_id
        self.kind = kind
        self.message = message


class StartupFailed(_Record):
    """The child could not build the service; ``error`` is what the factory raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Shutdown(_Record):
    """The client asks the server loop to stop."""

    __slots__ = ()


class OpenChannel(_Record):
    """The client asks to send a side channel: the server answers ``Return`` when it can
    take a descriptor with the next ``Channel`` frame, or ``Fail`` (``NO_CHANNEL``)."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class Channel(_Record):
    """This frame carries a socket (``SCM_RIGHTS``): one client thread's own connection.

    With ``doorbell``, an eventfd follows the socket: the server rings it before
    each write to the socket and when it closes it (see ``_protocol``).
    The server answers ``Return`` once it serves the socket, or ``Fail``
    (``NO_CHANNEL``) if the descriptors did not come with the frame.
    """

    __slots__ = ("call_id", "doorbell")

    def __init__(self, call_id: int, doorbell: bool = False) -> None:
        self.call_id = call_id
        self.doorbell = doorbell


class Get(_Record):
    """Read the public property or data attribute ``name`` of the service."""

    __slots__ = ("call_id", "name")

    def __init__(self, call_id: int, name: str) -> None:
        self.call_id = call_id
        self.name = name


class Describe(_Record):
    """Say the ``Kind`` of ``name``, a name the server's hello did not list."""

    __slots__ = ("call_id", "name")

    def __init__(self, call_id: int, name: str) -> None:
        self.call_id = call_id
        self.name = name


class Items(_Record):
    """Items a generator method yielded, in order; ``seq`` numbers a stream's frames from 1.

    A stream ends with the call's ``Return`` (its value is ignored) or ``Raise``.
    """

    __slots__ = ("call_id", "seq", "items")  # noqa: RUF023 (the order of the fields)

    def __init__(self, call_id: int, seq: int, items: list[Any]) -> None:
        self.call_id = call_id
        self.seq = seq
        self.items = items


class Credit(_Record):
    """The consumer of stream ``call_id`` took every item of ``frames`` more frames."""

    __slots__ = ("call_id", "frames")

    def __init__(self, call_id: int, frames: int) -> None:
        self.call_id = call_id
        self.frames = frames


class Cancel(_Record):
    """Stop stream ``call_id``: the consumer is gone (the generator is closed)."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


Message = (
    Items
    | Credit
    | Cancel
    | Hello
    | Call
    | Get
    | Describe
    | Return
    | Raise
    | Fail
    | StartupFailed
    | Shutdown
    | OpenChannel
    | Channel
)
