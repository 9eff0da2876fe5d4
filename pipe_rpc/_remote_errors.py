"""Exceptions across the wire: what a raising side sends, and what the caller rebuilds.

Theory of operation. The payload of a ``Raise`` (or a ``StartupFailed``) is
plain data: the exception's type name, its message, its formatted traceback,
and the exception itself in one of three *forms*: pickled whole, pickled as
``(type, args, attributes)`` for a type whose ``__init__`` does not take its
own ``args``, or not at all when it would not pickle. The caller rebuilds what
it can and falls back to a ``RemoteError`` carrying the name and message; the
traceback text becomes a ``RemoteTraceback`` cause either way. A peer that
decodes with the restricted unpickler gets only the whole form, pickled by
reference (``_by_reference``), and rebuilds only allowed types.

Tracebacks are formatted here by hand (``format_traceback``): the standard
formatter's column markers parse each source line, which made an exception's
round trip several times slower than a return.
"""

from __future__ import annotations

import builtins
import linecache
import pickle
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import SerializationError
from ._pickling import dumps

if TYPE_CHECKING:
    from ._by_reference import ByReference

BUILTIN_EXCEPTIONS = frozenset(
    obj
    for obj in vars(builtins).values()
    if isinstance(obj, type) and issubclass(obj, BaseException)
)

# Exception payload forms.
_FORM_PICKLE = 0  # the exception pickled as itself
_FORM_PARTS = 1  # (type, args, attributes) for types whose __init__ does not accept their own args
_FORM_NONE = 2  # it would not pickle: only its name, message and traceback travel
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
        type(error) in BUILTIN_EXCEPTIONS
        and not isinstance(error, _PICKY_BUILTINS)
        and not getattr(error, "__dict__", None)
        and all(type(arg) in _PLAIN_TYPES for arg in error.args)
    )


def exception_payload(error: BaseException, by_reference: ByReference | None = None) -> bytes:
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


def rebuild_exception(
    form: object, blob: object, allowed: Mapping[tuple[str, str], object] | None
) -> BaseException:
    """The exception a payload's ``form`` and ``blob`` hold; ``allowed``: the peer is
    untrusted and only these globals may be built (with the restricted unpickler).

    Raises:
        Exception: it cannot be rebuilt (the caller falls back to a ``RemoteError``).
    """
    if not isinstance(blob, bytes):
        raise TypeError("no pickled exception")
    if allowed is not None:
        if form != _FORM_PICKLE:
            raise TypeError("untrusted peers only send plain exceptions")
        from ._untrusted import restricted_loads

        error = restricted_loads(blob, allowed=allowed)
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
