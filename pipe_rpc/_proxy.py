"""Proxies: ``Proxy``, the bound remote method, ``options()``, and the option checks.

A proxy turns ``proxy.add(1, 2)`` into ``invoker.invoke("add", (1, 2), {}, timeout)``
on whatever made it: a ``Client`` or a ``Server``. Underscore names are answered
locally, without a message.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from ._errors import PipeRPCError
from ._messages import Kind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from concurrent.futures import Future

T = TypeVar("T")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: "The invoker's own default", where a timeout is expected.
DEFAULT: Any = _Default()


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """Return ``timeout`` as a float if it is ``None`` or a number > 0, else raise ``ValueError``.

    An infinite timeout is ``None``: no deadline.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"{what} must be None or > 0, got {timeout!r}")
    if math.isinf(timeout):
        return None
    return float(timeout)


def fresh_error(error: PipeRPCError) -> PipeRPCError:
    """A copy of ``error`` for one more caller (each raise gets its own traceback)."""
    fresh = copy.copy(error)
    fresh.__cause__ = error.__cause__
    return fresh


class Invoker(Protocol):
    """What a proxy calls through: a ``Client`` or a ``Server``."""

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any: ...

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service (from the server's hello, or asked once)."""
        ...

    def get(self, name: str, timeout: float | None) -> Any:
        """Read the service's public property or data attribute ``name``."""
        ...

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running event loop, without blocking it."""
        ...

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """``invoke`` whose outcome completes a future; returns once the call is sent."""
        ...

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Iterator[Any]:
        """Call a generator method: an iterator of its items, as they come."""
        ...

    def astream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """Call a generator or async generator method: an async iterator of its items."""
        ...


class _Method:
    """A bound remote method: ``proxy.add`` in ``proxy.add(1, 2)``."""

    __slots__ = ("_invoke", "_invoker", "_name", "_timeout")

    def __init__(self, invoker: Invoker, name: str, timeout: float | None) -> None:
        self._invoker = invoker
        self._invoke = invoker.invoke
        self._name = name
        self._timeout = timeout

    # ``self`` is positional-only, so that a service's keyword named ``self`` passes.
    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(self._name, args, kwargs, self._timeout)

    def __repr__(self) -> str:
        return f"<remote method {self._name}>"


class _AsyncMethod(_Method):
    """A bound remote ``async def`` method: calling it gives an awaitable, as its type says."""

    __slots__ = ()

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._invoker.ainvoke(self._name, args, kwargs, self._timeout)

    def __repr__(self) -> str:
        return f"<remote async method {self._name}>"


class _StreamMethod(_Method):
    """A bound remote generator method: calling it gives an iterator, as its type says."""

    __slots__ = ()

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._invoker.stream(self._name, args, kwargs, self._timeout)


class _AsyncStreamMethod(_Method):
    """A bound remote async generator method: calling it gives an async iterator."""

    __slots__ = ()

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._invoker.astream(self._name, args, kwargs, self._timeout)


class Proxy:
    """Turns attribute calls into remote calls; underscore names are answered locally."""

    def __init__(self, invoker: Invoker, timeout: float | None) -> None:
        object.__setattr__(self, "_pipe_rpc_invoker", invoker)
        object.__setattr__(self, "_pipe_rpc_timeout", timeout)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(
                f"{name!r}: a pipe_rpc proxy serves only the public names of its service "
                "(no leading underscore)"
            )
        invoker = self._pipe_rpc_invoker
        kind = invoker.kind(name)
        if kind in _READ:  # a fresh value at each read: one round trip
            return invoker.get(name, self._pipe_rpc_timeout)
        method = _METHODS.get(kind, _Method)(invoker, name, self._pipe_rpc_timeout)
        object.__setattr__(self, name, method)  # cache: the next look-up skips __getattr__
        return method

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot set {name!r} on a pipe_rpc proxy")

    def __repr__(self) -> str:
        return f"<pipe_rpc proxy for {self._pipe_rpc_invoker!r}>"

    _pipe_rpc_invoker: Invoker
    _pipe_rpc_timeout: float | None


#: What a proxy hands out for each kind of method.
_METHODS: dict[Kind, type[_Method]] = {
    Kind.ASYNC: _AsyncMethod,
    Kind.GENERATOR: _StreamMethod,
    Kind.ASYNC_GENERATOR: _AsyncStreamMethod,
}

#: The kinds of names a proxy reads instead of calling.
_READ = frozenset({Kind.PROPERTY, Kind.ATTRIBUTE})


def options(proxy: T, *, timeout: float | None) -> T:
    """The same proxy with per-call options: ``options(calc, timeout=0.5).add(1, 2)``.

    Args:
        proxy: a pipe_rpc proxy (a server's, a client's, a pool's, or another
            ``options()``'s).
        timeout: seconds for each call made through the new proxy (``None``: no
            bound; ``inf`` is ``None``).

    Returns:
        A proxy of the same type, sharing the same connection.

    Example::

        fast = pipe_rpc.options(calc, timeout=0.1)
        fast.add(1, 2)  # CallTimeoutError after 0.1 s

    Raises:
        TypeError: ``proxy`` is not a pipe_rpc proxy.
        ValueError: ``timeout`` is not ``None`` or > 0.
    """
    if not isinstance(proxy, Proxy):
        raise TypeError(f"options() takes a pipe_rpc proxy, got {type(proxy).__name__}")
    return cast(T, Proxy(proxy._pipe_rpc_invoker, check_timeout(timeout)))
