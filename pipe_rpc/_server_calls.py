"""A server's calls: finding the live child for each, restarting a dead one, and
what a failed call does to its child.

Theory of operation. Every way in (``invoke`` for the proxy, ``ainvoke``,
``submit``, ``stream``, ``astream``, ``get``, ``kind``) first takes the current
child (``_current``). A child not seen to end is taken without a lock: the
watcher thread of a client with side channels, or one poll of the sentinel
under ``restart="on-failure"``, says whether it has. A dead child is, under
the lock, either replaced by a fresh one from the factory
(``restart="on-failure"``; a call in flight is never retried) or reported: its
call fails with ``WorkerDiedError`` carrying the tail of its standard error,
and the death is logged once. A call that timed out (or was cancelled) kills
the child under ``on_timeout="kill"``; a protocol error always does.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ._child_handle import Child, ServerHandle, log
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    PipeRPCError,
    ProtocolError,
    WorkerDiedError,
)
from ._liveness import GENERATION, check_owner, fork_generation
from ._messages import Kind
from ._proxy import DEFAULT, fresh_error

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ._options import ServerOptions


class ServerCalls:
    """The call front-end of ``Server`` (see the module's docstring)."""

    _handle: ServerHandle
    _server_options: ServerOptions
    #: The fork generation the server was made in: a forked copy may not call.
    _generation: int

    if TYPE_CHECKING:

        def _start(self, wait: bool = True) -> None: ...

    def _current(self) -> Child:
        """The live child for a call, restarting a dead one if the policy says so."""
        handle = self._handle
        child = handle.child
        # The common case in attribute reads: a child not seen to end. A client with side
        # channels has a thread watching the child, whose word costs nothing; without it
        # a restarting server polls the sentinel.
        if (
            child is not None
            and not child.ended
            and not handle.closed
            and child.core.broken is None
        ):
            monitor = child.core.lanes.monitor
            if monitor is None:
                if not (self._server_options.restart == "on-failure" and child.sentinel_fired()):
                    return child
            elif not monitor.ended:
                return child
        with handle.lock:
            if handle.closed:
                raise ClientClosedError("the server was closed")
            child = handle.child
            assert child is not None
            dead = child.client.broken is not None or child.has_ended()
            if not dead:
                return child
            if self._server_options.restart != "on-failure":
                child.client.connection_lost("the server process has ended")
                broken = child.client.broken
                assert broken is not None
                error = fresh_error(broken)
                child.note_death(error)
                raise error
            child.stop(graceful=0)
            self._start()
            child = handle.child
            assert child is not None
            return child

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` in the child (the proxy's way in)."""
        if self._generation != GENERATION[0]:  # ``_child_for_call``, written out
            check_owner(self._generation, "server")
        child = self._current()
        if timeout is DEFAULT:  # ``Client.invoke``, written out
            timeout = child.client.timeout
        try:
            return child.core.call(method, args, kwargs, timeout)
        except (CallTimeoutError, ProtocolError) as exc:
            self._failed(child, exc, method)
            raise
        except WorkerDiedError as exc:
            child.note_death(exc)
            raise

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running event loop (``acall``'s way in).

        Cancelling the awaiting task acts as the call's timeout: under
        ``on_timeout="kill"`` the child is killed.
        """
        import asyncio

        child = self._child_for_call()
        try:
            return await child.client.ainvoke(method, args, kwargs, timeout)
        except (CallTimeoutError, ProtocolError) as exc:
            self._failed(child, exc, method)
            raise
        except WorkerDiedError as exc:
            child.note_death(exc)
            raise
        except asyncio.CancelledError:
            self._failed(child, CallTimeoutError(f"{method}() was cancelled"), method)
            raise

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """``invoke`` whose outcome completes a future (``submit``'s way in).

        ``future.cancel()`` acts as the call's timeout: under ``on_timeout="kill"``
        the child is killed.
        """
        child = self._child_for_call()
        future = child.client.submit(method, args, kwargs, timeout)
        future.on_cancel.append(functools.partial(self._cancelled, child, method))
        return future

    def _cancelled(self, child: Child, method: str) -> None:
        self._failed(child, CallTimeoutError(f"{method}() was cancelled"), method)

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Iterator[Any]:
        """Call a generator method in the child: an iterator of its items (the proxy's way
        in). A wait for an item that times out acts as ``on_timeout`` says."""
        child = self._child_for_call()
        return child.client.stream(
            method, args, kwargs, timeout, functools.partial(self._stream_failed, child, method)
        )

    def astream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """Call a generator or async generator method: an async iterator of its items."""
        child = self._child_for_call()
        return child.client.astream(
            method, args, kwargs, timeout, functools.partial(self._stream_failed, child, method)
        )

    def _stream_failed(self, child: Child, method: str, exc: BaseException) -> None:
        if isinstance(exc, CallTimeoutError | ProtocolError):
            self._failed(child, exc, method)

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service (the proxy's way to answer an attribute)."""
        return self._child_for_call().client.kind(name)

    def get(self, name: str, timeout: float | None) -> Any:
        """Read the service's public property or data attribute ``name`` (via the proxy)."""
        child = self._child_for_call()
        try:
            return child.client.get(name, timeout)
        except (CallTimeoutError, ProtocolError) as exc:
            self._failed(child, exc, name)
            raise
        except WorkerDiedError as exc:
            child.note_death(exc)
            raise

    def _child_for_call(self) -> Child:
        if self._generation != fork_generation():
            check_owner(self._generation, "server")
        return self._current()

    def _failed(self, child: Child, exc: PipeRPCError, method: str) -> None:
        """A call of ``method`` on ``child`` failed with ``exc``: kill the child if that
        is the policy."""
        if isinstance(exc, ProtocolError):
            child.stop(graceful=0)
        elif self._server_options.on_timeout == "kill":
            log().warning(
                "server process %d: %s() timed out; killing it (on_timeout='kill')",
                child.pid,
                method,
            )
            child.stop(graceful=0)
