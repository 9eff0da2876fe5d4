"""The exposure rules: which names of a service a peer may call or read, and running them.

Only public names are served: no leading underscore, no dots. A name's kind
(method, ``async def``, generator, property, data attribute) is found from the
class as stored, without running a getter (``_static_attribute``), so that
asking about a property never runs it; a property is read only by a ``Get``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._chunks import MAP, run_chunk
from ._errors import MethodNotFoundError
from ._messages import Call, Fail, FailKind, Get, Kind

#: Code flags of the functions whose calls the proxy answers otherwise than with a value.
_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200


class Dispatcher:
    """Finds and runs the public methods of one service object, and reads its attributes."""

    def __init__(self, service: object) -> None:
        self.service = service
        self._methods: dict[str, Callable[..., Any]] = {MAP: self._run_chunk}
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

    def _run_chunk(self, name: str, items: list[Any]) -> bytes:
        """A chunk of ``Pool.map``: ``name`` run on each item (see ``_chunks``)."""
        return run_chunk(self.lookup(name), items, name)

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


#: What ``_static_attribute`` returns for a name it did not find.
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


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
