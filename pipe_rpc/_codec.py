"""Payloads: the only module that pickles.

Messages become frames laid out by ``_wire`` (``tag | call id | payload``).
Keeping the tag and call id out of the pickle means a payload that will not
unpickle fails only its own call, and a body that is not even a frame is
spotted before anything is unpickled.

Payloads are pickled with protocol 5. The standard pickler is tried first
(it is several times faster); cloudpickle is used when it fails, or when the
pickle of at most ``MAIN_SCAN_LIMIT`` bytes names ``__main__`` (cloudpickle
sends such objects by value, so they also work in a child that cannot import
the parent's ``__main__``; a larger pickle is not scanned, as the scan would
cost as much as the copy). Buffers
that pickle hands out of band (numpy arrays, ``PickleBuffer``) are written
after the pickle without a copy (``_wire.frame``). A ``bytes``
argument or result of at least ``OOB_BYTES`` goes out of band too, as a
``PickleBuffer``: its size has ``AS_BYTES`` set, and the reader hands pickle a
``bytes`` copy of it, so it unpickles as the very ``bytes`` it was (a copy
that unpickling it in band would make anyway).

Untrusted peers are decoded by ``_untrusted.restricted_loads`` instead of
``pickle.loads``: only plain data and the caller's allowed types.
"""

from __future__ import annotations

import builtins
import io
import linecache
import os
import pickle
import reprlib
import struct
import traceback
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from ._errors import ProtocolError, RemoteError, RemoteTraceback, SerializationError
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
from ._wire import (
    BODY_HEAD,
    BODY_HEAD_SIZE,
    HEAD,
    OUT_OF_BAND,
    Body,
    Buffer,
    frame,
    in_band_frame,
    split_out_of_band,
)

if TYPE_CHECKING:
    from ._by_reference import ByReference

# cloudpickle and the restricted unpickler are imported when first needed: a child
# started by spawn or forkserver imports this module, and every millisecond of
# import is a millisecond of spawn().

_HELLO = struct.Struct("!HI")
_COUNT64 = struct.Struct("!Q")
# The tags as plain ints for the hot paths (comparing with an IntEnum member is slower).
CALL, RETURN = int(Tag.CALL), int(Tag.RETURN)
#: A ``bytes`` argument or result this long is written out of band, not copied into the pickle.
OOB_BYTES = 1 << 16

_BUILTIN_EXCEPTIONS = frozenset(
    obj
    for obj in vars(builtins).values()
    if isinstance(obj, type) and issubclass(obj, BaseException)
)

# Exception payload forms.
_FORM_PICKLE = 0  # the exception pickled as itself
_FORM_PARTS = 1  # (type, args, attributes) for types whose __init__ does not accept their own args
_FORM_NONE = 2  # it would not pickle: only its name, message and traceback travel


def dumps(obj: object, *, what: str, buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Pickle ``obj`` (standard pickle first, cloudpickle as the fallback).

    Raises:
        SerializationError: neither could pickle it; ``what`` names it in the message.
    """
    callback = None if buffers is None else buffers.append
    try:
        data = pickle.dumps(obj, 5, buffer_callback=callback)
        if not _names_main(data):
            return data
    except KeyboardInterrupt:
        raise
    except (
        BaseException
    ):  # a __reduce__ may raise anything: GeneratorExit, a BaseException of its own
        pass
    if buffers is not None:
        buffers.clear()
    try:
        return _cloudpickle_dumps(obj, callback)
    except KeyboardInterrupt:
        raise
    except _OpenFileError as exc:
        raise SerializationError(
            f"{what} could not be pickled: it holds an open file ({exc}); "
            "send its contents or its path instead"
        ) from None
    except BaseException as exc:
        raise SerializationError(f"{what} could not be pickled: {exc!r}") from exc


class _OpenFileError(TypeError):
    """An open file object met while pickling: never sent as a value."""


def _cloudpickle_dumps(obj: object, callback: Any) -> bytes:
    """``cloudpickle.dumps``, refusing open files (it would send a text file's
    contents as a ``StringIO`` and leave the file open where it was)."""
    global _Pickler
    if _Pickler is None:
        import cloudpickle

        class _RefusingPickler(cloudpickle.Pickler):
            def reducer_override(self, value: Any) -> Any:
                if isinstance(value, io.IOBase):
                    raise _OpenFileError(repr(value))
                return super().reducer_override(value)

        _Pickler = _RefusingPickler
    out = io.BytesIO()
    _Pickler(out, 5, buffer_callback=callback).dump(obj)
    return out.getvalue()


#: cloudpickle's pickler that refuses open files, made when first needed.
_Pickler: Any = None


#: Argument types whose pickle holds neither a global nor an out-of-band buffer.
_ATOMIC = frozenset({int, float, bool, type(None), str, bytes})
#: Pickles up to this size are scanned for references to ``__main__``.
MAIN_SCAN_LIMIT = 1 << 14


def _names_main(data: bytes) -> bool:
    # find() rather than `in`: bytes.__contains__ first tries the needle as an int.
    return len(data) <= MAIN_SCAN_LIMIT and data.find(b"__main__") >= 0


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
    if _names_main(payload):
        payload = dumps(obj, what=f"{what}{method}()" if method else what, buffers=buffers)
    if not buffers:
        return in_band_frame(tag, call_id, payload)
    return frame(tag, call_id, payload, buffers, as_bytes)


class UndecodablePayload(Exception):
    """A well-formed frame whose payload would not unpickle: only its own call fails."""

    def __init__(self, call_id: int, message: str) -> None:
        super().__init__(message)
        self.call_id = call_id
        self.message = message


class Codec:
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
                **{("builtins", e.__qualname__): e for e in _BUILTIN_EXCEPTIONS},
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
            return frame(Tag.RAISE, message.call_id, _exception_payload(message.error), [])
        if isinstance(message, Fail):
            payload = pickle.dumps((int(message.kind), message.message), 5)
            return frame(Tag.FAIL, message.call_id, payload, [])
        if isinstance(message, StartupFailed):
            return frame(Tag.STARTUP_FAILED, 0, _exception_payload(message.error), [])
        if isinstance(message, Hello):
            payload = HELLO_MAGIC + _HELLO.pack(message.version, message.pid)
            if message.kinds:  # plain data: a dict of str to int
                payload += pickle.dumps({k: int(v) for k, v in message.kinds.items()}, 5)
            return frame(Tag.HELLO, 0, payload, [])
        if isinstance(message, Items):
            # Long bytes items go out of band, as a return value's do: no copy into the pickle.
            wrap = _OutOfBandBytes()
            body = (message.seq, [wrap(item) for item in message.items])
            return _fast_frame(Tag.ITEMS, message.call_id, body, "stream items", "", wrap.made)
        if isinstance(message, Credit):
            return frame(Tag.CREDIT, message.call_id, _COUNT64.pack(message.frames), [])
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
            if kind not in _ATOMIC:
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
        if type(value) in _ATOMIC:  # no global, no buffer: nothing to look for in the pickle
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
        payload = _exception_payload(error, self._errors_by_reference)
        return in_band_frame(int(Tag.RAISE), call_id, payload)

    # -- decoding ---------------------------------------------------------

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
        if raw_tag == Tag.STARTUP_FAILED:
            return StartupFailed(self._decode_exception(call_id, payload))
        if raw_tag == Tag.HELLO:
            return self._decode_hello(payload)
        if raw_tag == Tag.ITEMS:
            parts = self._loads(call_id, payload, buffers, "stream items")
            if type(parts) is not tuple or len(parts) != 2 or type(parts[0]) is not int:
                raise ProtocolError(f"a malformed items frame: {reprlib.repr(parts)}")
            seq, items = parts
            if type(items) is not list:
                raise ProtocolError(f"stream items came as {type(items).__name__}, not a list")
            return Items(call_id, seq, items)
        if raw_tag in (Tag.CREDIT, Tag.CANCEL):
            if raw_tag == Tag.CANCEL:
                return Cancel(call_id)
            if len(payload) != _COUNT64.size:
                raise ProtocolError("a credit frame of the wrong size")
            return Credit(call_id, _COUNT64.unpack_from(payload)[0])
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
        head = len(HELLO_MAGIC) + _HELLO.size
        magic = bytes(payload[: len(HELLO_MAGIC)])
        if magic != HELLO_MAGIC or len(payload) < head:
            raise ProtocolError(f"peer is not a pipe_rpc peer: hello was {bytes(payload[:32])!r}")
        version, pid = _HELLO.unpack_from(payload, len(HELLO_MAGIC))
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
        try:
            type_name, message, tb, form, blob = parts
            type_name, message, tb = str(type_name), str(message), str(tb)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed exception payload: {reprlib.repr(parts)}") from exc
        error: BaseException
        try:
            error = self._rebuild_exception(form, blob)
        except (Exception, SystemExit):
            error = RemoteError(
                f"{type_name}: {message}", remote_type=type_name, remote_traceback=tb
            )
        else:
            # SystemExit, KeyboardInterrupt and every other non-Exception (a group holding
            # one included) would slip past the caller's ``except Exception``: never re-raise.
            if not isinstance(error, Exception):
                error = RemoteError(
                    f"{type_name}: {message}", remote_type=type_name, remote_traceback=tb
                )
        error.__cause__ = RemoteTraceback(tb)
        return error

    def _rebuild_exception(self, form: object, blob: object) -> BaseException:
        if not isinstance(blob, bytes):
            raise TypeError("no pickled exception")
        if self.untrusted:
            if form != _FORM_PICKLE:
                raise TypeError("untrusted peers only send plain exceptions")
            from ._untrusted import restricted_loads

            error = restricted_loads(blob, allowed=self._allowed_errors)
        elif form == _FORM_PICKLE:
            error = pickle.loads(blob)
        elif form == _FORM_PARTS:
            cls, args, state = pickle.loads(blob)
            error = cls.__new__(cls, *args)
            error.args = args
            error.__dict__.update(state)
        else:
            raise TypeError(f"unknown exception form {form!r}")
        if not isinstance(error, BaseException):
            raise TypeError(f"not an exception: {type(error)!r}")
        return error


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


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def format_traceback(error: BaseException) -> str:
    """The traceback text of ``error`` and its chain, as ``traceback.format_exception`` lays it out.

    Without the column markers (``~~~^^^``) that Python 3.11+ adds: working them
    out parses each source line, which made an exception's round trip several
    times slower than a return. Exception groups keep the full formatter.
    """
    if isinstance(error, BaseExceptionGroup):
        return "".join(traceback.format_exception(error))
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for exc, link in reversed(chain):
        if exc.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            for frame, lineno in traceback.walk_tb(exc.__traceback__):
                code = frame.f_code
                filename = _real_filename(code.co_filename, frame.f_globals)
                parts.append(f'  File "{filename}", line {lineno}, in {code.co_name}\n')
                line = linecache.getline(filename, lineno, frame.f_globals).strip()
                if line:
                    parts.append(f"    {line}\n")
        parts.extend(_format_exception_only(exc))
        parts.append(link)
    return "".join(parts)


#: The file name cloudpickle gives every code object it sends by value (a function or
#: class of the main script, a lambda): it keeps its line numbers, not its file.
_BY_VALUE_FILENAME = "<dynamic-code>"


def _real_filename(filename: str, frame_globals: dict[str, Any]) -> str:
    """The file that code sent by value came from: the ``__file__`` of its module's
    globals, which cloudpickle sends along with the code."""
    if filename == _BY_VALUE_FILENAME:
        module_file = frame_globals.get("__file__")
        if isinstance(module_file, str):
            return module_file
    return filename


#: Exceptions whose last line the standard library builds itself: a SyntaxError shows the
#: offending line, and from 3.12 these name errors add a "Did you mean" suggestion.
_STANDARD_LINE = (SyntaxError, AttributeError, NameError, ImportError)


def _format_exception_only(exc: BaseException) -> list[str]:
    """``traceback.format_exception_only(exc)``, done by hand in the common case.

    The standard function builds a whole ``TracebackException`` for the one last
    line. The types in ``_STANDARD_LINE`` and an exception with ``__notes__`` still
    go through it.
    """
    cls = type(exc)
    if issubclass(cls, _STANDARD_LINE) or getattr(exc, "__notes__", None) is not None:
        return traceback.format_exception_only(exc)
    name = cls.__qualname__
    module = cls.__module__
    if module not in ("__main__", "builtins"):
        name = f"{module if isinstance(module, str) else '<unknown>'}.{name}"
    try:
        text = str(exc)
    except BaseException:  # as the standard library does: a failing str() is shown, not raised
        text = "<exception str() failed>"
    return [f"{name}: {text}\n" if text else f"{name}\n"]


_PLAIN_TYPES = frozenset((str, int, float, bool, bytes, type(None)))


#: Builtin exceptions whose constructor accepts only some argument shapes.
_PICKY_BUILTINS = (UnicodeError, SyntaxError, BaseExceptionGroup)


def _plain_builtin(error: BaseException) -> bool:
    """A builtin exception holding only plain values: its pickle surely loads."""
    return (
        type(error) in _BUILTIN_EXCEPTIONS
        and not isinstance(error, _PICKY_BUILTINS)
        and not getattr(error, "__dict__", None)
        and all(type(arg) in _PLAIN_TYPES for arg in error.args)
    )


def _exception_payload(error: BaseException, by_reference: ByReference | None = None) -> bytes:
    """Everything the caller needs to rebuild ``error``, as plain data.

    ``by_reference``: the caller decodes with the restricted unpickler, which
    rebuilds only an exception pickled whole from allowed globals.
    """
    cls = type(error)
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        tb = format_traceback(error)
    except BaseException as exc:  # the error's own code runs here (__str__, a bad __cause__)
        tb = f"<the traceback could not be formatted: {type(exc).__name__}>"
    try:
        message = str(error)
    except BaseException:
        message = "<str() failed>"
    form, blob = _FORM_NONE, None
    if by_reference is not None:
        try:
            blob, form = by_reference.dumps(error, what="exception"), _FORM_PICKLE
        except SerializationError:
            pass
        return pickle.dumps((type_name, message, tb, form, blob), 5)
    # Pickling and unpickling run the error's own code, which may raise any BaseException
    # (GeneratorExit, say); only an interrupt of this process is not the error's failure.
    try:
        blob = dumps(error, what="exception")
        if not _plain_builtin(error):
            pickle.loads(blob)  # rebuildable here, so most likely in the caller too
        form = _FORM_PICKLE
    except KeyboardInterrupt:
        raise
    except BaseException:
        try:
            blob = dumps((cls, error.args, dict(vars(error))), what="exception")
            form = _FORM_PARTS
        except KeyboardInterrupt:
            raise
        except BaseException:
            blob = None
    return pickle.dumps((type_name, message, tb, form, blob), 5)
