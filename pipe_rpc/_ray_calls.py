"""A Ray server's calls: sending each to the live actor, and Ray's errors as pipe_rpc's.

Theory of operation. A call is ``actor.call.remote(name, args, kwargs)``,
waited for with ``ray.get(ref, timeout=...)`` (``invoke``), awaited
(``ainvoke``), or completing a future when its reference does (``submit``); a
generator method goes through Ray's streaming generators (``RayStream``). The
service's own exceptions come back as ``Raised`` values and are raised again
here; every error of Ray's becomes pipe_rpc's in ``_failure``: a timeout (which
kills the actor under ``on_timeout="kill"``), a death, a value Ray could not
carry. Each call is counted, a stream as one call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

import ray
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayError,
    RayTaskError,
)

from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    MethodNotFoundError,
    SerializationError,
    WorkerDiedError,
)
from ._futures import CallFuture
from ._messages import Kind
from ._proxy import DEFAULT
from ._ray_actor import Raised
from ._ray_handle import Actor
from ._ray_stream import RayStream
from ._stats import ERROR, OK, TIMEOUT, Counters

OnTimeout = Literal["abandon", "kill"]


def check_name(name: str) -> None:
    """Refuse a private or dotted name locally, before anything is sent."""
    if not isinstance(name, str) or name.startswith("_") or "." in name:
        raise MethodNotFoundError(
            f"{name!r} is not a public method: only public methods are served"
        )


class RayCalls:
    """The call front-end of ``RayServer`` (see the module's docstring)."""

    timeout: float | None
    _counters: Counters
    _on_timeout: OnTimeout
    _closed: bool
    _actor: Actor

    if TYPE_CHECKING:

        def _live(self) -> Actor: ...

    def _submit(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Actor, ray.ObjectRef[Any]]:
        """Send one call; returns once it is on its way."""
        check_name(name)
        actor = self._live()
        try:
            ref: ray.ObjectRef[Any] = actor.handle.call.remote(name, args, kwargs)
        except TypeError as exc:  # Ray: "Could not serialize the argument ..."
            raise SerializationError(
                f"an argument of {name}() could not be pickled: {exc}"
            ) from exc
        return actor, ref

    def _finish(
        self, actor: Actor, name: str, ref: ray.ObjectRef[Any], timeout: float | None
    ) -> Any:
        """Wait for one call's reply (``timeout`` None: for ever, but a death ends it)."""
        try:
            value = ray.get(ref, timeout=timeout)
        except (RayError, TimeoutError) as exc:
            raise self._failure(actor, name, exc, timeout) from None
        return _value(value)

    def _failure(
        self, actor: Actor, name: str, error: BaseException, timeout: float | None
    ) -> Exception:
        """The pipe_rpc error for a Ray error of one call."""
        if isinstance(error, GetTimeoutError | TimeoutError):
            if self._on_timeout == "kill":
                actor.kill(f"it was killed after {name}() timed out")
            return CallTimeoutError(f"{name}() got no reply within {timeout} s")
        if self._closed:
            return ClientClosedError("the server was closed")
        if isinstance(error, ActorUnavailableError):
            return ConnectionLostError(f"the Ray actor is unreachable: {error}")
        if isinstance(error, RayActorError):
            actor.died(error)
            return WorkerDiedError(
                f"the Ray actor (pid {actor.pid}) died during {name}(): {actor.dead}"
            )
        if isinstance(error, RayTaskError):
            # The service's own exceptions come back as Raised values, so a failed task
            # is Ray failing to carry the call: the result would not pickle, or the
            # arguments would not unpickle in the actor.
            cause = error.cause
            failure = SerializationError(
                f"{name}(): Ray could not carry the arguments or the result: "
                f"{type(cause).__name__}: {cause}"
            )
            failure.__cause__ = error
            return failure
        return ConnectionLostError(f"Ray failed {name}(): {type(error).__name__}: {error}")

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` on the actor (the proxy's way in)."""
        if timeout is DEFAULT:
            timeout = self.timeout
        started = self._counters.begin(method)
        outcome = ERROR
        try:
            actor, ref = self._submit(method, args, kwargs)
            value = self._finish(actor, method, ref, timeout)
            outcome = OK
            return value
        except CallTimeoutError:
            outcome = TIMEOUT
            raise
        finally:
            self._counters.end(method, started, outcome)

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Iterator[Any]:
        """A generator method through Ray's streaming generators (the proxy's way in)."""
        return self._stream(method, args, kwargs, timeout)

    def astream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """A generator or async generator method's items, awaited on the running loop."""
        return self._stream(method, args, kwargs, timeout)

    def kind(self, name: str) -> Kind:
        """What the actor said ``name`` is at its start: an ``async def``, generator or
        async generator method; anything else is answered as a plain method (reading a
        property or data attribute through a Ray proxy is not supported)."""
        return self._actor.kinds.get(name, Kind.METHOD)

    def get(self, name: str, timeout: float | None) -> Any:
        """Not supported on Ray (see ``kind``)."""
        raise MethodNotFoundError(f"{name!r}: a Ray proxy reads no attributes, only calls")

    async def ainvoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """``invoke`` awaited on the running loop (``acall``'s way in)."""
        return await self._acall(method, args, kwargs, timeout)

    def submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Future[Any]:
        """``invoke`` whose outcome completes a future (``submit``'s way in).

        The call's timeout is not applied to a submitted call on Ray; ``cancel()``
        cancels the task (and kills the actor under ``on_timeout="kill"``).
        """
        actor, ref = self._submit(method, args, kwargs)
        future = CallFuture()
        started = self._counters.begin(method)

        def done(_: object) -> None:
            try:
                value = self._finish(actor, method, ref, None)
            except BaseException as exc:
                timed_out = isinstance(exc, CallTimeoutError) or future.cancelled()
                self._counters.end(method, started, TIMEOUT if timed_out else ERROR)
                if not future.done():
                    with contextlib.suppress(Exception):
                        future.set_exception(exc)
                return
            self._counters.end(method, started, TIMEOUT if future.cancelled() else OK)
            if not future.done():
                with contextlib.suppress(Exception):
                    future.set_result(value)

        def cancelled() -> None:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
            if self._on_timeout == "kill":
                actor.kill(f"it was killed after {method}() was cancelled")

        future.on_cancel.append(cancelled)
        ref.future().add_done_callback(done)
        return future

    async def _acall(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = DEFAULT,
    ) -> Any:
        """Await one call without blocking the event loop (for the future ``acall``).

        Cancelling the awaiting task acts as the call's timeout (abandon or kill).
        """
        if timeout is DEFAULT:
            timeout = self.timeout
        started = self._counters.begin(name)
        outcome = ERROR
        try:
            actor, ref = self._submit(name, args, kwargs)
            try:
                value = await asyncio.wait_for(_awaited(ref), timeout)
            except asyncio.CancelledError:
                outcome = TIMEOUT  # a cancellation is the call's timeout
                if self._on_timeout == "kill":
                    actor.kill(f"it was killed after {name}() was cancelled")
                raise
            except (RayError, TimeoutError) as exc:
                failure = self._failure(actor, name, exc, timeout)
                if isinstance(failure, CallTimeoutError):
                    outcome = TIMEOUT
                raise failure from None
            value = _value(value)
            outcome = OK
            return value
        finally:
            self._counters.end(name, started, outcome)

    def _stream(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = DEFAULT,
    ) -> RayStream[Any]:
        """Call a generator method; its items arrive as the actor yields them.

        Ray's streaming generator carries them; ``close()`` cancels the task (the
        service's generator is closed, its ``finally`` runs). With
        ``max_concurrency=1`` an open stream holds the actor's one slot.
        """
        if timeout is DEFAULT:
            timeout = self.timeout
        check_name(name)
        actor = self._live()
        try:
            generator = actor.handle.stream.options(num_returns="streaming").remote(
                name, args, kwargs
            )
        except TypeError as exc:
            raise SerializationError(
                f"an argument of {name}() could not be pickled: {exc}"
            ) from exc
        return RayStream(self, actor, name, generator, timeout)


async def _awaited(ref: ray.ObjectRef[Any]) -> Any:
    return await ref


def _value(value: Any) -> Any:
    if type(value) is Raised:
        raise value.rebuild()
    return value
