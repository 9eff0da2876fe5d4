"""The actor side of ``pipe_rpc.ray``: the service in a Ray actor, and how its errors travel.

``ServiceActor`` is a plain class (``pipe_rpc.ray`` makes it a Ray actor class
when first needed), so this module imports without Ray and its rules can be
tested without a cluster. It serves the same rules as ``serve()``: only public
callables of the service; an exception the service raises comes back as a
``Raised`` *value*, never as a failed Ray task. That keeps the caller's side in
our hands: ``SystemExit`` and ``KeyboardInterrupt`` are reported instead of
ending the actor (Ray treats a ``SystemExit`` in an actor task as the actor's
exit), an exception that does not pickle still travels as its name, message
and traceback, and Ray has no failed object to log as "unhandled" when a
timed-out call's error is never fetched.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import threading
import traceback
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from typing import Any

from ._errors import MethodNotFoundError, RemoteError, RemoteTraceback, StartupError


class Raised:
    """An exception raised by the service, as plain data: what crosses back instead of a value.

    ``blob`` is the exception pickled by cloudpickle, or its ``(type, args,
    attributes)`` when the type's ``__init__`` cannot take its own ``args``, or
    ``None`` if neither pickles.
    """

    __slots__ = ("blob", "by_parts", "message", "traceback", "type_name")

    def __init__(
        self, type_name: str, message: str, traceback: str, blob: bytes | None, by_parts: bool
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.blob = blob
        self.by_parts = by_parts

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            Raised,
            (self.type_name, self.message, self.traceback, self.blob, self.by_parts),
        )

    @classmethod
    def capture(cls, error: BaseException, *, skip_frames: int = 0) -> Raised:
        """Record ``error``; its first ``skip_frames`` frames (ours) are left out."""
        import cloudpickle

        tb = error.__traceback__
        for _ in range(skip_frames):
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
        error = error.with_traceback(tb)
        kind = type(error)
        type_name = f"{kind.__module__}.{kind.__qualname__}"
        try:
            text = "".join(traceback.format_exception(error))
        except BaseException as exc:  # the error's own code runs here (__str__, a bad __cause__)
            text = f"<the traceback could not be formatted: {type(exc).__name__}>"
        try:
            message = str(error)
        except BaseException:
            message = "<str() failed>"
        blob: bytes | None = None
        by_parts = False
        try:
            blob = cloudpickle.dumps(error.with_traceback(None))
            pickle.loads(blob)  # rebuildable here, so most likely in the caller too
        except BaseException:
            try:
                blob = cloudpickle.dumps((kind, error.args, dict(vars(error))))
                by_parts = True
            except BaseException:
                blob = None
        return cls(type_name, message, text, blob, by_parts)

    def rebuild(self) -> Exception:
        """The exception as the caller sees it: its own type when it can be rebuilt and is an
        ``Exception``, else ``RemoteError``; ``__cause__`` carries the remote traceback."""
        error: BaseException | None = None
        if self.blob is not None:
            try:
                if self.by_parts:
                    kind, args, state = pickle.loads(self.blob)
                    error = kind.__new__(kind, *args)
                    error.args = args
                    error.__dict__.update(state)
                else:
                    error = pickle.loads(self.blob)
            except BaseException:
                error = None
        # SystemExit, KeyboardInterrupt and other non-Exceptions would slip past a caller's
        # ``except Exception``: they are never re-raised as themselves.
        if not isinstance(error, Exception):
            error = RemoteError(
                f"{self.type_name}: {self.message}",
                remote_type=self.type_name,
                remote_traceback=self.traceback,
            )
        error.__cause__ = RemoteTraceback(self.traceback)
        return error

    def startup_error(self) -> StartupError:
        """The error ``spawn()`` raises when the factory raised this."""
        error = StartupError(
            f"the factory raised {self.type_name}: {self.message}",
            remote_traceback=self.traceback,
        )
        error.__cause__ = RemoteTraceback(self.traceback)
        return error


def public_method(service: object, name: str) -> Callable[..., Any]:
    """The service's public callable ``name``, or ``MethodNotFoundError``."""
    if not isinstance(name, str) or name.startswith("_") or "." in name:
        raise MethodNotFoundError(
            f"{name!r} is not a public method: only public methods are served"
        )
    method = getattr(service, name, None)
    if method is None or not callable(method):
        raise MethodNotFoundError(f"the service has no public method {name!r}")
    return method  # type: ignore[no-any-return]


class ServiceActor:
    """The service inside a Ray actor. Its methods are what the caller's side sends.

    A factory that raises leaves the actor up with ``startup`` set, so ``hello()``
    can report it as ``StartupError`` instead of Ray's creation failure.
    """

    def __init__(self, factory: Callable[[], object]) -> None:
        self._released = threading.Event()
        self._service: object = None
        self._startup: Raised | None = None
        try:
            self._service = factory()
        except BaseException as exc:
            self._startup = Raised.capture(exc, skip_frames=1)

    def hello(self) -> tuple[int, Raised | None, dict[str, int]]:
        """This worker's pid, the factory's exception if it raised, and the kind of each
        public method that is not a plain one (a ``Kind``'s value)."""
        kinds: dict[str, int] = {}
        if self._startup is None:
            from ._dispatch import Dispatcher
            from ._messages import Kind

            for name, kind in Dispatcher(self._service).kinds().items():
                if kind in (Kind.ASYNC, Kind.GENERATOR, Kind.ASYNC_GENERATOR):
                    kinds[name] = kind.value
        return os.getpid(), self._startup, kinds

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one call; the service's exception comes back as a ``Raised`` value."""
        try:
            if self._startup is not None:
                raise RuntimeError("the service was not built: its factory raised")
            method = public_method(self._service, name)
        except BaseException as exc:
            return Raised.capture(exc)
        try:
            value = method(*args, **kwargs)
            if inspect.iscoroutine(value):  # an ``async def`` method: run it to its end here
                value = asyncio.run(value)
            return value
        except BaseException as exc:
            return Raised.capture(exc, skip_frames=1)

    def stream(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Generator[Any, None, None]:
        """Run a generator method, yielding its items; a ``Raised`` is the last item if it fails."""
        try:
            method = public_method(self._service, name)
        except BaseException as exc:
            yield Raised.capture(exc)
            return
        try:
            items = method(*args, **kwargs)
            if inspect.isasyncgen(items):  # an ``async def`` generator method
                items = _stepped(items)
            yield from items
        except GeneratorExit:
            raise
        except BaseException as exc:
            yield Raised.capture(exc, skip_frames=1)

    def watch(self) -> None:
        """Runs, in a concurrency group of its own, until the actor ends or ``release()``.

        The caller keeps this call's reference: it fails the moment the actor dies,
        which is how an idle actor's death is seen without a call per check.
        """
        self._released.wait()

    def release(self) -> None:
        """End ``watch()``, so that a graceful exit is not held up by it."""
        self._released.set()


def _stepped(items: AsyncGenerator[Any, Any]) -> Iterator[Any]:
    """The items of an async generator, each awaited on a loop of the stream's own; a
    stream closed early closes the async generator (its ``finally`` runs)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                item = loop.run_until_complete(items.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            loop.run_until_complete(items.aclose())
        finally:
            loop.close()
