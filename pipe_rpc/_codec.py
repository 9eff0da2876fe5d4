"""Encoding messages into frames, and ``Codec``, which also decodes them (``_decoding``).

Messages become frames laid out by ``_wire`` (``tag | call id | payload``).
Keeping the tag and call id out of the pickle means a payload that will not
unpickle fails only its own call, and a body that is not even a frame is
spotted before anything is unpickled.

Payloads are pickled with protocol 5, by ``_pickling.dumps`` (the standard
pickler, cloudpickle as the fallback); the common case, a small plain pickle,
is done inline here (``_fast_frame``). Buffers
that pickle hands out of band (numpy arrays, ``PickleBuffer``) are written
after the pickle without a copy (``_wire.frame``). A ``bytes``
argument or result of at least ``OOB_BYTES`` goes out of band too, as a
``PickleBuffer``: its size has ``AS_BYTES`` set, and the reader hands pickle a
``bytes`` copy of it, so it unpickles as the very ``bytes`` it was (a copy
that unpickling it in band would make anyway). Exceptions travel as plain data
(``_remote_errors``).

Untrusted peers are decoded by ``_untrusted.restricted_loads`` instead of
``pickle.loads`` (see ``_decoding``): only plain data and the caller's allowed types.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from ._decoding import COUNT64, HELLO_HEAD, Decoder
from ._messages import (
    HELLO_MAGIC,
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Channel,
    Credit,
    Describe,
    Fail,
    Get,
    Hello,
    Items,
    Kind,
    Message,
    OpenChannel,
    Raise,
    Return,
    StartupFailed,
    Tag,
)
from ._pickling import MAIN_SCAN_LIMIT, dumps, names_main
from ._remote_errors import BUILTIN_EXCEPTIONS, exception_payload
from ._wire import BODY_HEAD_SIZE, HEAD, Buffer, frame, in_band_frame

if TYPE_CHECKING:
    from ._by_reference import ByReference

# cloudpickle and the restricted unpickler are imported when first needed: a child
# started by spawn or forkserver imports this module, and every millisecond of
# import is a millisecond of spawn().

# The tags as plain ints for the hot paths (comparing with an IntEnum member is slower).
CALL, RETURN = int(Tag.CALL), int(Tag.RETURN)
#: A ``bytes`` argument or result this long is written out of band, not copied into the pickle.
OOB_BYTES = 1 << 16

#: Types whose pickling runs no code of their own and holds no global (a long ``bytes``
#: still goes out of band: ``OOB_BYTES``).
ATOMIC = frozenset({int, float, bool, type(None), str, bytes})


def _fast_frame(
    tag: int,
    call_id: int,
    obj: object,
    what: str,
    method: str,
    as_bytes: Collection[pickle.PickleBuffer] = (),
) -> list[Buffer]:
    """``frame(tag, call_id, dumps(obj))``, the common case (small, plain pickle) inlined."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(obj, 5, buffer_callback=buffers.append)
    except KeyboardInterrupt:
        raise
    except BaseException:  # a __reduce__ may raise anything: dumps() below reports it
        payload = b"__main__"  # take the full path below
    size = len(payload) + BODY_HEAD_SIZE
    if size <= MAIN_SCAN_LIMIT and not buffers and payload.find(b"__main__") < 0:
        return [HEAD.pack(size, tag, call_id) + payload]  # the common case
    if names_main(payload):
        payload = dumps(obj, what=f"{what}{method}()" if method else what, buffers=buffers)
    if not buffers:
        return in_band_frame(tag, call_id, payload)
    return frame(tag, call_id, payload, buffers, as_bytes)


class Codec(Decoder):
    """Turns messages into frame segments and frame bodies into messages.

    Args:
        untrusted: decode every payload with the restricted unpickler.
        allowed_types: with ``untrusted``, the extra types a payload may build; with
            ``by_reference``, the types the peer allows.
        by_reference: the peer decodes what this side sends with the restricted
            unpickler (it started us with ``untrusted=True``): replies are pickled
            with every global by name, and only allowed ones (see
            ``encode_reply_by_reference``).
    """

    def __init__(
        self,
        *,
        untrusted: bool = False,
        allowed_types: Iterable[type] = (),
        by_reference: bool = False,
    ) -> None:
        self.untrusted = untrusted
        self._allowed: Mapping[tuple[str, str], object] = {}
        self._allowed_errors: Mapping[tuple[str, str], object] = {}
        if untrusted or by_reference:
            from ._untrusted import allowed_globals

            self._allowed = allowed_globals(allowed_types)
            self._allowed_errors = {
                **self._allowed,
                **{("builtins", e.__qualname__): e for e in BUILTIN_EXCEPTIONS},
            }
        self.by_reference: ByReference | None = None
        self._errors_by_reference: ByReference | None = None
        if by_reference:
            from ._by_reference import ByReference

            self.by_reference = ByReference(self._allowed)
            self._errors_by_reference = ByReference(self._allowed_errors)

    # -- encoding ---------------------------------------------------------

    def encode(self, message: Message) -> list[Buffer]:
        """The frame for ``message`` as segments; raises SerializationError for a payload."""
        if isinstance(message, Call):
            return self.encode_call(message.call_id, message.method, message.args, message.kwargs)
        if isinstance(message, Return):
            return self.encode_return(message.call_id, message.value)
        if isinstance(message, Raise):
            return frame(Tag.RAISE, message.call_id, exception_payload(message.error), [])
        if isinstance(message, Fail):
            payload = pickle.dumps((int(message.kind), message.message), 5)
            return frame(Tag.FAIL, message.call_id, payload, [])
        if isinstance(message, StartupFailed):
            return frame(Tag.STARTUP_FAILED, 0, exception_payload(message.error), [])
        if isinstance(message, Hello):
            payload = HELLO_MAGIC + HELLO_HEAD.pack(message.version, message.pid)
            if message.kinds:  # plain data: a dict of str to int
                payload += pickle.dumps({k: int(v) for k, v in message.kinds.items()}, 5)
            return frame(Tag.HELLO, 0, payload, [])
        if isinstance(message, Items):
            # Long bytes items go out of band, as a return value's do: no copy into the pickle.
            wrap = _OutOfBandBytes()
            body = (message.seq, [wrap(item) for item in message.items])
            return _fast_frame(Tag.ITEMS, message.call_id, body, "stream items", "", wrap.made)
        if isinstance(message, Credit):
            return frame(Tag.CREDIT, message.call_id, COUNT64.pack(message.frames), [])
        if isinstance(message, Cancel):
            return frame(Tag.CANCEL, message.call_id, b"", [])
        if isinstance(message, Get | Describe):
            tag = Tag.GET if isinstance(message, Get) else Tag.DESCRIBE
            return frame(tag, message.call_id, message.name.encode(), [])
        if isinstance(message, OpenChannel):
            return frame(Tag.OPEN_CHANNEL, message.call_id, b"", [])
        if isinstance(message, Channel):
            return frame(Tag.CHANNEL, message.call_id, b"\x01" if message.doorbell else b"", [])
        return frame(Tag.SHUTDOWN, 0, b"", [])

    def encode_call(
        self, call_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[Buffer]:
        """The hot path of ``encode`` for a call, without building a record."""
        wrap: _OutOfBandBytes | None = None
        plain = not kwargs
        for arg in args:
            kind = type(arg)
            if kind is bytes and len(arg) >= OOB_BYTES:
                wrap = _OutOfBandBytes()
                args = tuple(map(wrap, args))
                plain = False
                break
            if kind not in ATOMIC:
                plain = False
        if plain:  # no buffer to send out of band, no global to look for in __main__
            return in_band_frame(CALL, call_id, pickle.dumps((method, args, kwargs), 5))
        for arg in kwargs.values():
            if type(arg) is bytes and len(arg) >= OOB_BYTES:
                wrap = wrap or _OutOfBandBytes()
                kwargs = {key: wrap(value) for key, value in kwargs.items()}
                break
        return _fast_frame(
            CALL,
            call_id,
            (method, args, kwargs),
            "arguments of ",
            method,
            () if wrap is None else wrap.made,
        )

    def encode_return(self, call_id: int, value: object, method: str = "") -> list[Buffer]:
        """The hot path of ``encode`` for a return value (of ``method``, for errors)."""
        what = "the result of " if method else "the result"
        if type(value) is bytes and len(value) >= OOB_BYTES:
            wrapped = pickle.PickleBuffer(value)
            return _fast_frame(RETURN, call_id, wrapped, what, method, (wrapped,))
        if type(value) in ATOMIC:  # no global, no buffer: nothing to look for in the pickle
            return in_band_frame(RETURN, call_id, pickle.dumps(value, 5))
        return _fast_frame(RETURN, call_id, value, what, method)

    def encode_reply_by_reference(
        self, call_id: int, ok: bool, value: object, method: str
    ) -> list[Buffer]:
        """The reply to ``method``: its result, or the exception it raised, for a peer
        that decodes it with the restricted unpickler (``by_reference``).

        Every global in it is written by name (a class of the parent's script as
        ``__main__``), never by value, and in band.

        Raises:
            SerializationError: the result holds a type the peer does not allow (the
                message names it, and ``method``), or it would not pickle. An exception
                that cannot be sent so is sent by name, message and traceback alone.
        """
        if self.by_reference is None:
            raise ValueError("this codec does not pickle by reference")
        if ok:
            payload = self.by_reference.dumps(value, what=f"the result of {method}()")
            return in_band_frame(RETURN, call_id, payload)
        error = cast(BaseException, value)
        payload = exception_payload(error, self._errors_by_reference)
        return in_band_frame(int(Tag.RAISE), call_id, payload)


class _OutOfBandBytes:
    """Wraps the long ``bytes`` of one message in ``PickleBuffer``s, and remembers them."""

    def __init__(self) -> None:
        self.made: list[pickle.PickleBuffer] = []

    def __call__(self, value: object) -> object:
        if type(value) is bytes and len(value) >= OOB_BYTES:
            wrapped = pickle.PickleBuffer(value)
            self.made.append(wrapped)
            return wrapped
        return value


def hello(kinds: dict[str, Kind] | None = None) -> Hello:
    """This process's hello (a server's lists the kinds of its service's names)."""
    return Hello(PROTOCOL_VERSION, os.getpid(), kinds)
