"""Decoding frame bodies into messages: the side that meets what the peer sent.

Theory of operation. A body is checked before anything in it is unpickled: its
head gives the tag and call id, and a payload with out-of-band buffers is cut
into its pickle and its buffers (``_wire.split_out_of_band``). A payload that
will not unpickle raises ``UndecodablePayload``, which fails its own call only;
a body that is not a frame of this protocol, or a payload an untrusted peer
was not allowed to send, raises ``ProtocolError``, which ends the connection.

Untrusted peers are decoded by ``_untrusted.restricted_loads`` instead of
``pickle.loads``: only plain data and the caller's allowed types. The
restricted unpickler is imported when first needed.
"""

from __future__ import annotations

import pickle
import reprlib
import struct
from collections.abc import Mapping
from typing import Any, cast

from ._errors import ProtocolError, RemoteError, RemoteTraceback
from ._messages import (
    HELLO_MAGIC,
    PROTOCOL_VERSION,
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
    Tag,
)
from ._remote_errors import rebuild_exception
from ._wire import BODY_HEAD, BODY_HEAD_SIZE, OUT_OF_BAND, Body, split_out_of_band

#: A hello's payload after the magic: the protocol version and the pid.
HELLO_HEAD = struct.Struct("!HI")
#: A credit frame's payload: the frames granted.
COUNT64 = struct.Struct("!Q")


class UndecodablePayload(Exception):
    """A well-formed frame whose payload would not unpickle: only its own call fails."""

    def __init__(self, call_id: int, message: str) -> None:
        super().__init__(message)
        self.call_id = call_id
        self.message = message


class Decoder:
    """The decoding half of ``Codec``: frame bodies into messages.

    ``Codec.__init__`` sets what it reads: whether the peer is ``untrusted``, and
    the globals it may build (``_allowed``; ``_allowed_errors`` adds the builtin
    exceptions).
    """

    untrusted: bool
    _allowed: Mapping[tuple[str, str], object]
    _allowed_errors: Mapping[tuple[str, str], object]

    def loads(self, call_id: int, payload: memoryview, what: str) -> Any:
        """Unpickle one in-band payload (trusted or restricted, as this codec is set up).

        Raises:
            ProtocolError: an untrusted peer sent something not allowed.
            UndecodablePayload: it would not unpickle.
        """
        if not self.untrusted:
            try:
                return pickle.loads(payload)
            except (Exception, SystemExit) as exc:
                raise UndecodablePayload(
                    call_id, f"{what} could not be unpickled: {exc!r}"
                ) from exc
        return self._loads(call_id, payload, None, what)

    def decode(self, body: Body) -> Message:
        """The message in one frame body.

        Raises:
            ProtocolError: the body is not a frame of this protocol.
            UndecodablePayload: the frame is sound but its payload will not unpickle.
        """
        view = memoryview(body)
        if len(view) < BODY_HEAD_SIZE:
            raise ProtocolError(
                f"frame of {len(view)} bytes is shorter than its {BODY_HEAD_SIZE}-byte header"
            )
        raw_tag, call_id = BODY_HEAD.unpack_from(view)
        payload = view[BODY_HEAD_SIZE:]
        buffers: list[memoryview | bytes] | None = None
        if raw_tag & OUT_OF_BAND:
            raw_tag &= ~OUT_OF_BAND
            payload, buffers = split_out_of_band(payload)
        if raw_tag == Tag.RETURN:
            return Return(call_id, self._loads(call_id, payload, buffers, "result"))
        if raw_tag == Tag.CALL:
            method, args, kwargs = self._loads(call_id, payload, buffers, "arguments")
            return Call(call_id, method, args, kwargs)
        if raw_tag == Tag.RAISE:
            return Raise(call_id, self._decode_exception(call_id, payload))
        if raw_tag == Tag.FAIL:
            kind, text = self._loads(call_id, payload, None, "failure")
            return Fail(call_id, FailKind(kind), text)
        if raw_tag == Tag.ITEMS:
            parts = self._loads(call_id, payload, buffers, "stream items")
            if type(parts) is not tuple or len(parts) != 2 or type(parts[0]) is not int:
                raise ProtocolError(f"a malformed items frame: {reprlib.repr(parts)}")
            seq, items = parts
            if type(items) is not list:
                raise ProtocolError(f"stream items came as {type(items).__name__}, not a list")
            return Items(call_id, seq, items)
        return self._decode_control(raw_tag, call_id, payload)

    def _decode_control(self, raw_tag: int, call_id: int, payload: memoryview) -> Message:
        """``decode`` for the frames that set up, steer or end calls, not carry their values."""
        if raw_tag == Tag.STARTUP_FAILED:
            return StartupFailed(self._decode_exception(call_id, payload))
        if raw_tag == Tag.HELLO:
            return self._decode_hello(payload)
        if raw_tag in (Tag.CREDIT, Tag.CANCEL):
            if raw_tag == Tag.CANCEL:
                return Cancel(call_id)
            if len(payload) != COUNT64.size:
                raise ProtocolError("a credit frame of the wrong size")
            return Credit(call_id, COUNT64.unpack_from(payload)[0])
        if raw_tag in (Tag.GET, Tag.DESCRIBE):
            try:
                name = bytes(payload).decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError(f"a name that is not UTF-8: {bytes(payload[:32])!r}") from exc
            return Get(call_id, name) if raw_tag == Tag.GET else Describe(call_id, name)
        if raw_tag == Tag.SHUTDOWN:
            return Shutdown()
        if raw_tag == Tag.OPEN_CHANNEL:
            return OpenChannel(call_id)
        if raw_tag == Tag.CHANNEL:
            if len(payload) > 1 or (payload and payload[0] != 1):
                raise ProtocolError(f"a channel frame's payload is {bytes(payload[:16])!r}")
            return Channel(call_id, doorbell=bool(payload))
        raise ProtocolError(f"unknown frame tag {raw_tag}")

    def _loads(
        self, call_id: int, payload: memoryview, buffers: list[memoryview | bytes] | None, what: str
    ) -> Any:
        if not self.untrusted:
            try:
                return pickle.loads(payload, buffers=buffers)
            except (Exception, SystemExit) as exc:
                raise UndecodablePayload(
                    call_id, f"{what} could not be unpickled: {exc!r}"
                ) from exc
        from ._untrusted import UntrustedDataError, restricted_loads

        try:
            return restricted_loads(payload, allowed=self._allowed, buffers=buffers)
        except UntrustedDataError as exc:
            raise ProtocolError(f"untrusted peer sent a {what} that is not allowed: {exc}") from exc
        except (Exception, SystemExit) as exc:
            raise UndecodablePayload(call_id, f"{what} could not be unpickled: {exc!r}") from exc

    def _decode_hello(self, payload: memoryview) -> Hello:
        head = len(HELLO_MAGIC) + HELLO_HEAD.size
        magic = bytes(payload[: len(HELLO_MAGIC)])
        if magic != HELLO_MAGIC or len(payload) < head:
            raise ProtocolError(f"peer is not a pipe_rpc peer: hello was {bytes(payload[:32])!r}")
        version, pid = HELLO_HEAD.unpack_from(payload, len(HELLO_MAGIC))
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
            )
        if len(payload) == head:
            return Hello(version, pid)
        try:
            table = self._loads(0, payload[head:], None, "hello")
            kinds = {str(name): Kind(kind) for name, kind in table.items()}
        except (UndecodablePayload, AttributeError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the peer's table of names is malformed: {exc}") from exc
        return Hello(version, pid, kinds)

    def _decode_exception(self, call_id: int, payload: memoryview) -> BaseException:
        parts = self._loads(call_id, payload, None, "exception")
        return exception_from(parts, self._allowed_errors if self.untrusted else None)


def exception_from(
    parts: object, allowed: Mapping[tuple[str, str], object] | None
) -> BaseException:
    """The exception an exception payload's unpickled ``parts`` describe (see
    ``_remote_errors.exception_payload``), with the remote traceback as its cause;
    ``allowed``: the peer is untrusted, and only these globals may be built.

    Raises:
        ProtocolError: ``parts`` is not an exception payload.
    """
    try:
        raw_type, raw_message, raw_tb, form, blob = cast("tuple[object, ...]", parts)
        type_name, message, tb = str(raw_type), str(raw_message), str(raw_tb)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed exception payload: {reprlib.repr(parts)}") from exc
    error: BaseException
    try:
        error = rebuild_exception(form, blob, allowed)
    except (Exception, SystemExit):
        error = RemoteError(f"{type_name}: {message}", remote_type=type_name, remote_traceback=tb)
    else:
        # SystemExit, KeyboardInterrupt and every other non-Exception (a group holding
        # one included) would slip past the caller's ``except Exception``: never re-raise.
        if not isinstance(error, Exception):
            error = RemoteError(
                f"{type_name}: {message}", remote_type=type_name, remote_traceback=tb
            )
    error.__cause__ = RemoteTraceback(tb)
    return error
