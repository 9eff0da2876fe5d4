"""The sync front-end: ``Client[T]``, a typed proxy over one connection.

Everything a call does (lanes, waiting, interrupts, failure) lives in the
connection core (``_connection``); the client picks the timeout and hands
each call to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection as Pipe
from time import perf_counter_ns
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._codec import Codec
from ._connection import Connection
from ._errors import CallTimeoutError, PipeRPCError
from ._liveness import HasSentinel, PeerMonitor
from ._messages import Kind
from ._proxy import DEFAULT, Proxy, check_timeout
from ._stats import ERROR, OK, TIMEOUT
from ._stream import RemoteAsyncIterator, RemoteIterator, StreamCall

if TYPE_CHECKING:
    from ._futures import CallFuture

# The asyncio and futures front-ends (``_aio``, ``_futures``) are imported when first
# used: a child imports this module, and asyncio or concurrent.futures (which imports
# logging) would cost its start.

T = TypeVar("T")


#: ``_futures.submit_call`` once the first ``submit`` imported it (an import statement
#: run per call costs a microsecond).
_SUBMIT_CALL: list[Callable[..., CallFuture]] = []


def _load_submit_call() -> Callable[..., CallFuture]:
    from ._futures import submit_call

    _SUBMIT_CALL.append(submit_call)
    return submit_call


class Client(Generic[T]):
    """A thread-safe client over one end of a duplex ``multiprocessing.Pipe``.

    Args:
        conn: the client's end; ``serve()`` runs on the other.
        timeout: default seconds for every call (``None``: no bound).
        process: the server's process (anything with ``.sentinel``), so that
            its death fails calls at once with ``WorkerDiedError``.
        untrusted: decode replies with the restricted unpickler (see README).
        allowed_types: with ``untrusted``, the types a reply may contain besides plain data.
        max_reply_bytes: refuse replies larger than this (``ProtocolError``).

    ``Client[P](conn).proxy`` is typed as ``P`` (a class or a ``typing.Protocol``).

    Example::

        with pipe_rpc.Client[Calculator](parent, process=p) as client:
            assert client.proxy.add(1, 2) == 3
            assert client.call("add", 1, 2) == 3  # by name

    Raises (from its calls):
        CallTimeoutError, SerializationError, MethodNotFoundError, ClientClosedError,
        ConnectionLostError, WorkerDiedError, ProtocolError, and the service's own
        exceptions, rebuilt.
    """

    def __init__(
        self,
        conn: Pipe,
        *,
        timeout: float | None = None,
        process: HasSentinel | None = None,
        untrusted: bool = False,
        allowed_types: Iterable[type] = (),
        max_reply_bytes: int | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        codec = Codec(untrusted=untrusted, allowed_types=allowed_types)
        self._core = Connection(conn, codec, process=process, max_frame=max_reply_bytes)
        self.proxy: T = cast(T, Proxy(self, DEFAULT))

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the service's method ``name`` with the client's default timeout."""
        return self._core.call(name, args, kwargs, self.timeout)

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` and wait for its reply (``timeout`` DEFAULT: the client's)."""
        if timeout is DEFAULT:
            timeout = self.timeout
        return self._core.call(method, args, kwargs, timeout)

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running event loop, without blocking it."""
        from ._aio import call_async

        if timeout is DEFAULT:
            timeout = self.timeout
        counters = self._core.counters
        if counters is None:
            return await call_async(self._core, method, args, kwargs, timeout)
        counts = counters.of(method)
        started = 0
        outcome = ERROR
        try:
            next(counts.started)  # the first call in the ``try``: counted only inside it
            started = perf_counter_ns()
            value = await call_async(self._core, method, args, kwargs, timeout)
            outcome = OK
            return value
        except CallTimeoutError:
            outcome = TIMEOUT
            raise
        except BaseException as exc:  # a cancellation is the call's timeout
            if type(exc).__name__ == "CancelledError":
                outcome = TIMEOUT
            raise
        finally:
            next(counts.ended)  # first: see ``MethodCounts.note``
            counts.note(started, outcome)

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> CallFuture:
        """``invoke`` whose outcome completes a future; returns once the call is sent."""
        submit_call = _SUBMIT_CALL[0] if _SUBMIT_CALL else _load_submit_call()
        if timeout is DEFAULT:
            timeout = self.timeout
        return submit_call(self._core, method, args, kwargs, timeout)

    def stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_error: Callable[[BaseException], None] = lambda exc: None,
    ) -> RemoteIterator:
        """Call a generator method: an iterator of its items, as they come."""
        call, call_id, timeout = self._start_stream(method, args, kwargs, timeout)
        return RemoteIterator(self._core, call, call_id, timeout, on_error)

    def astream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_error: Callable[[BaseException], None] = lambda exc: None,
    ) -> RemoteAsyncIterator:
        """Call a generator or async generator method: an async iterator of its items."""
        call, call_id, timeout = self._start_stream(method, args, kwargs, timeout)
        return RemoteAsyncIterator(self._core, call, call_id, timeout, on_error)

    def _start_stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> tuple[StreamCall, int, float | None]:
        call = StreamCall(method)
        call_id = self._core.start_stream(call, args, kwargs)
        return call, call_id, self.timeout if timeout is DEFAULT else timeout

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service (from the server's hello, or asked once)."""
        return self._core.kind(name)

    def get(self, name: str, timeout: float | None = DEFAULT) -> Any:
        """Read the service's public property or data attribute ``name``."""
        return self._core.get(name, self.timeout if timeout is DEFAULT else timeout)

    def close(self) -> None:
        """Ask the server to stop, fail calls in flight (``ClientClosedError``), close the pipe."""
        self._core.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the server's hello (``spawn`` uses this to surface ``StartupError``)."""
        self._core.wait_ready(timeout)

    def connection_lost(self, reason: str) -> None:
        """Fail every pending and later call as if the peer had gone (its exit code if known)."""
        self._core.connection_lost(reason)

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._core.closed

    @property
    def broken(self) -> PipeRPCError | None:
        """Why the connection is dead, or ``None`` while it works."""
        return self._core.broken

    @property
    def late_replies(self) -> int:
        """Replies that came after their call had timed out, and were dropped."""
        return self._core.late_replies

    @property
    def monitor(self) -> PeerMonitor | None:
        """The thread watching the server's process, once the client has side channels."""
        return self._core.monitor

    @property
    def death_hint(self) -> Callable[[int], str]:
        """Text added to ``WorkerDiedError`` for an exit code (the limits' explanation)."""
        return self._core.death_hint

    @death_hint.setter
    def death_hint(self, hint: Callable[[int], str]) -> None:
        self._core.death_hint = hint

    @property
    def death_tail(self) -> Callable[[], str]:
        """The dead child's last standard error, for ``WorkerDiedError.stderr_tail``."""
        return self._core.death_tail

    @death_tail.setter
    def death_tail(self, tail: Callable[[], str]) -> None:
        self._core.death_tail = tail

    def __enter__(self) -> Client[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
