"""The messages that cross the pipe, as frozen records.

Every frame on the wire is ``length | tag | call id | payload`` (see ``_codec``);
these records are what the two ends see once a frame is decoded. They carry no
behaviour: ``_protocol`` decides what a message means, ``_codec`` how it looks.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

#: Bumped whenever the frame layout or a payload shape changes.
PROTOCOL_VERSION = 1

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


class FailKind(enum.IntEnum):
    """Why the server machinery (not the service) failed a call."""

    METHOD_NOT_FOUND = 1
    SERIALIZATION = 2


@attrs.frozen
class Hello:
    """The first message each end sends: who speaks, and which protocol version."""

    version: int
    pid: int


@attrs.frozen
class Call:
    """Run ``method(*args, **kwargs)`` on the service and reply with ``call_id``."""

    call_id: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@attrs.frozen
class Return:
    """The method returned ``value``."""

    call_id: int
    value: Any


@attrs.frozen
class Raise:
    """The method raised ``error``.

    In the server this is the live exception; in the client it is the rebuilt
    one, its ``__cause__`` a ``RemoteTraceback`` (or a ``RemoteError`` when it
    could not be rebuilt).
    """

    call_id: int
    error: BaseException


@attrs.frozen
class Fail:
    """The server could not run the call or send its result; nothing of the service's raised."""

    call_id: int
    kind: FailKind
    message: str


@attrs.frozen
class StartupFailed:
    """The child could not build the service; ``error`` is what the factory raised."""

    error: BaseException


@attrs.frozen
class Shutdown:
    """The client asks the server loop to stop."""


Message = Hello | Call | Return | Raise | Fail | StartupFailed | Shutdown
