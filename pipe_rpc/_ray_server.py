"""``pipe_rpc.ray.spawn()`` and ``RayServer``: one service on one Ray actor.

Theory of operation. Each actor is a ``ServiceActor`` (``_ray_actor``) made
with ``max_restarts=0`` and ``max_task_retries=0``: Ray never restarts it or
retries a call on its own, so a call in flight when it dies always fails, and
replacing it (``restart="on-failure"``) is ours to do, between calls, with the
same factory. Besides the calls, each actor runs one ``watch()`` task in a
concurrency group of its own; its reference fails the moment the actor dies,
and a callback on it marks the actor dead, so a death while idle is known
without a message per call. A call is ``actor.call.remote(name, args,
kwargs)`` and ``ray.get(ref, timeout=...)``; Ray's errors become pipe_rpc's
errors in ``_failure()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, TypeVar, cast

import ray
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayError,
    RayTaskError,
    TaskCancelledError,
)

from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    MethodNotFoundError,
    SerializationError,
    StartupError,
    WorkerDiedError,
    describe_exitcode,
)
from ._futures import CallFuture
from ._messages import Kind
from ._process import Server
from ._proxy import DEFAULT, Proxy, check_timeout
from ._ray_actor import Raised, ServiceActor
from ._server import check_max_concurrency
from ._stats import ERROR, OK, TIMEOUT, Counters, snapshot
from ._stats_types import Stats

T = TypeVar("T")

OnTimeout = Literal["abandon", "kill"]
RestartPolicy = Literal["never", "on-failure"]

#: Actor options that ``spawn()``'s own arguments decide; ``ray_options`` may not set them.
RESERVED_OPTIONS = frozenset({"max_concurrency", "max_restarts", "max_task_retries"})

_ACTOR_CLASS: Any = None
_INIT_LOCK = threading.Lock()


def ensure_ray() -> Any:
    """Join the Ray cluster the program has joined, or start a local one; the actor class."""
    global _ACTOR_CLASS
    with _INIT_LOCK:
        if not ray.is_initialized():
            ray.init()
        if _ACTOR_CLASS is None:
            _ACTOR_CLASS = ray.remote(concurrency_groups={"watch": 1})(ServiceActor)
        return _ACTOR_CLASS


def check_name(name: str) -> None:
    """Refuse a private or dotted name locally, before anything is sent."""
    if not isinstance(name, str) or name.startswith("_") or "." in name:
        raise MethodNotFoundError(
            f"{name!r} is not a public method: only public methods are served"
        )


def death_reason(error: BaseException | None) -> str:
    """Ray's own words for an actor's death, without its list of common causes."""
    text = "" if error is None else str(error)
    _, found, after = text.partition("The actor is dead because ")
    if found:
        text = after
    text = text.split(" Some common causes", 1)[0].strip()
    return text or f"{type(error).__name__} from Ray"


def death_word(error: BaseException | None) -> str:
    """A death's reason in a word, as far as Ray's message tells it: ``"exit 3"``,
    ``"SIGSEGV"``; ``"unknown"`` when it gives no exit code."""
    text = "" if error is None else str(error)
    found = re.search(r"exit(?:ed)? (?:with )?(?:an )?(?:exit )?code (-?\d+)", text)
    if found is None:
        return "unknown"
    code = int(found.group(1))
    if code < 0:
        return describe_exitcode(code).removeprefix("killed by ")
    if code > 128 and code - 128 in _SIGNALS:  # a shell's way of saying "killed by"
        return _SIGNALS[code - 128]
    return f"exit {code}"


_SIGNALS = {int(s): s.name for s in signal.Signals}


class Actor:
    """One Ray actor serving one service, and what we know of its end."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.hello: ray.ObjectRef[tuple[int, Raised | None, dict[str, int]]] = handle.hello.remote()
        self.pid: int | None = None
        self.kinds: dict[str, Kind] = {}  # the service's methods that are not plain ones
        #: Told a death's reason in a word (``"SIGKILL"``, ``"exit 3"``), once; not a close.
        self.on_death: Callable[[str], None] | None = None
        self.dead: str | None = None  # why it ended, once it has
        self._watch: ray.ObjectRef[None] | None = None

    @classmethod
    def launch(cls, factory: Callable[[], object], options: dict[str, Any]) -> Actor:
        """Ask Ray for the actor; returns before it is up (``ready()`` waits)."""
        return cls(ensure_ray().options(**options).remote(factory))

    def ready(self, timeout: float | None) -> None:
        """Wait for the service to be built; ``StartupError`` if it was not, and the actor dies."""
        try:
            pid, startup, kinds = ray.get(self.hello, timeout=timeout)
        except GetTimeoutError:
            self.kill("it did not start in time")
            raise StartupError(f"the Ray actor did not start within {timeout} s") from None
        except RayError as exc:
            self.kill("it failed while starting")
            raise StartupError(f"the Ray actor failed while starting: {death_reason(exc)}") from exc
        self.pid = pid
        self.kinds = {name: Kind(kind) for name, kind in kinds.items()}
        if startup is not None:
            self.kill("its factory raised")
            raise startup.startup_error()
        self._watch = self.handle.watch.options(concurrency_group="watch").remote()
        self._watch.future().add_done_callback(self._ended)

    def _ended(self, future: Future[None]) -> None:
        self.died(future.exception())

    def died(self, error: BaseException | None, word: str | None = None) -> None:
        """The actor is dead (``error``: Ray's word of it); the first word counts."""
        if self.dead is None:
            self.dead = death_reason(error)
            if self.on_death is not None:
                self.on_death(word or death_word(error))

    def kill(self, reason: str) -> None:
        """End the actor now (``ray.kill``: no graceful exit)."""
        if self.dead is None:
            self.dead = reason
            if self.on_death is not None:
                self.on_death("SIGKILL")
        _kill(self.handle)

    def begin_close(self) -> ray.ObjectRef[Any] | None:
        """Ask the actor to exit once its calls in flight are done; the reference to wait on."""
        if self.dead is not None:
            return None
        self.dead = "it was closed"
        try:
            self.handle.release.remote()  # watch() would hold the exit up
            ref: ray.ObjectRef[Any] = self.handle.__ray_terminate__.remote()
        except RayError:
            return None
        return ref


def _kill(handle: Any) -> None:
    try:
        if ray.is_initialized():
            ray.kill(handle, no_restart=True)
    except (RayError, ValueError):  # already gone, or Ray shut down under us
        pass


def finish_close(actors: list[tuple[Actor, ray.ObjectRef[Any] | None]], timeout: float) -> None:
    """Wait up to ``timeout`` s in all for graceful exits, then kill every actor."""
    refs = [ref for _, ref in actors if ref is not None]
    if refs and timeout > 0:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except RayError:
            pass
    for actor, _ in actors:
        _kill(actor.handle)


class _Holder:
    """The current actor's handle, for the finalizer (which must not hold the server)."""

    def __init__(self) -> None:
        self.handle: Any = None

    def kill(self) -> None:
        if self.handle is not None:
            _kill(self.handle)


class RayServer(Server[T]):
    """The handle to a service on a Ray actor; made by ``pipe_rpc.ray.spawn()``.

    A ``pipe_rpc.Server`` (``isinstance`` holds, and mypy sees ``Server[T]``)
    whose child is a Ray actor. ``Server.__init__`` is not called: it starts a
    ``multiprocessing`` child, and every method that would touch that child is
    overridden here. ``exitcode`` is always ``None``: Ray does not report an
    actor's exit code.
    """

    def __init__(
        self,
        factory: Callable[[], T],
        *,
        timeout: float | None,
        on_timeout: OnTimeout,
        restart: RestartPolicy,
        max_concurrency: int,
        name: str | None,
        ray_options: dict[str, Any],
        start_timeout: float | None,
        launched: Actor | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self._factory = factory
        self._on_timeout = on_timeout
        self._restart_on_failure = restart == "on-failure"
        self._name = name
        self._start_timeout = start_timeout
        self._options = {
            **ray_options,
            "max_concurrency": max_concurrency,
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        self._lock = threading.RLock()
        self._closed = False
        self._counters = Counters()
        self._counters.started(restart=False)
        self._holder = _Holder()
        # A server dropped without close() takes its actor with it (the watch task
        # would keep an actor whose handles are all gone alive).
        weakref.finalize(self, _Holder.kill, self._holder)
        self.proxy: T = cast(T, Proxy(self, DEFAULT))
        self._actor = launched or Actor.launch(factory, self._options)
        self._actor.on_death = self._counters.died
        self._holder.handle = self._actor.handle
        self._actor.ready(start_timeout)

    # -- calls ---------------------------------------------------------------

    def _live(self) -> Actor:
        """The live actor for a call, replacing a dead one if the policy says so."""
        actor = self._actor
        if actor.dead is None and not self._closed:
            return actor
        with self._lock:
            if self._closed:
                raise ClientClosedError("the server was closed")
            actor = self._actor
            if actor.dead is None:
                return actor
            if not self._restart_on_failure:
                raise WorkerDiedError(f"the Ray actor (pid {actor.pid}) has died: {actor.dead}")
            self._replace()
            return self._actor

    def _replace(self) -> None:
        self._actor.kill("it was replaced")
        self._actor = Actor.launch(self._factory, self._options)
        self._actor.on_death = self._counters.died
        self._holder.handle = self._actor.handle
        self._actor.ready(self._start_timeout)
        self._counters.started(restart=True)

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

    def stats(self) -> Stats:
        """A frozen snapshot of this server's counts: calls of every kind (a stream is
        one call), starts, restarts, and deaths by the reason Ray's message gives
        (``"unknown"`` when it names no exit code; ``"SIGKILL"`` for a kill)."""
        return snapshot([self._counters])

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

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close()`` without blocking the event loop (it runs on a worker thread)."""
        await asyncio.to_thread(self.close, timeout)

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

    # -- public --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The actor's worker process id (on whichever node it runs)."""
        return self._actor.pid

    @property
    def exitcode(self) -> int | None:
        """Always ``None``: Ray does not report an actor's exit code."""
        return None

    @property
    def start_method(self) -> NoReturn:
        """A Ray actor has no ``multiprocessing`` start method."""
        raise AttributeError("a Ray actor has no start method")

    def is_alive(self) -> bool:
        """Whether the current actor is running, as far as Ray has told us."""
        return not self._closed and self._actor.dead is None

    def close(self, timeout: float = 5.0) -> None:
        """Let the actor finish its calls in flight and exit, for up to ``timeout`` s; then kill it.

        Idempotent. Calls that fail because of it raise ``ClientClosedError``.
        """
        with self._lock:
            already, self._closed = self._closed, True
            actor = self._actor
        if already:
            _kill(actor.handle)
            return
        finish_close([(actor, actor.begin_close())], timeout)

    def kill(self) -> None:
        """Kill the actor now (``ray.kill``)."""
        with self._lock:
            self._actor.kill("it was killed by kill()")

    def restart(self) -> None:
        """Replace the actor with a fresh one from the factory."""
        with self._lock:
            if self._closed:
                raise ClientClosedError("the server was closed")
            self._replace()

    def __enter__(self) -> T:
        if self._closed:
            raise ClientClosedError("the server was closed")
        return self.proxy

    def __repr__(self) -> str:
        label = f" {self._name!r}" if self._name else ""
        state = "alive" if self.is_alive() else f"ended: {self._actor.dead or 'closed'}"
        return f"<pipe_rpc.ray.RayServer{label} pid={self.pid} {state}>"


async def _awaited(ref: ray.ObjectRef[Any]) -> Any:
    return await ref


def _value(value: Any) -> Any:
    if type(value) is Raised:
        raise value.rebuild()
    return value


class RayStream(Generic[T]):
    """The items of a generator method on a Ray actor, to iterate with ``for`` or
    ``async for`` (Ray's own ``ObjectRefGenerator`` either way); ``close()`` and
    ``aclose()`` cancel the task."""

    def __init__(
        self,
        server: RayServer[Any],
        actor: Actor,
        name: str,
        generator: ray.ObjectRefGenerator,
        timeout: float | None,
    ) -> None:
        self._server = server
        self._actor = actor
        self._name = name
        self._generator: ray.ObjectRefGenerator | None = generator
        self._timeout = timeout
        self._counters: Counters | None = server._counters  # until the stream's end is counted
        self._started = server._counters.begin(name)

    def _end(self, outcome: int) -> None:
        """Count the stream's end, once: a stream counts as one call."""
        counters, self._counters = self._counters, None
        if counters is not None:
            counters.end(self._name, self._started, outcome)

    def _failed(self, exc: BaseException) -> Exception:
        failure = self._server._failure(self._actor, self._name, exc, self._timeout)
        self._end(TIMEOUT if isinstance(failure, CallTimeoutError) else ERROR)
        self.close()
        return failure

    def __iter__(self) -> RayStream[T]:
        return self

    def __next__(self) -> T:
        generator = self._generator
        if generator is None:
            raise StopIteration
        try:
            if self._timeout is not None:
                ready, _ = ray.wait([generator], timeout=self._timeout)
                if not ready:
                    raise GetTimeoutError("no item in time")
            ref = next(generator)
            value = ray.get(ref)
        except StopIteration:
            self._generator = None
            self._end(OK)
            raise
        except (RayError, TimeoutError) as exc:
            raise self._failed(exc) from None
        return self._item(value)

    def __aiter__(self) -> RayStream[T]:
        return self

    async def __anext__(self) -> T:
        generator = self._generator
        if generator is None:
            raise StopAsyncIteration
        try:
            ref = await asyncio.wait_for(generator.__anext__(), self._timeout)
            value = await ref
        except StopAsyncIteration:
            self._generator = None
            self._end(OK)
            raise
        except asyncio.CancelledError:  # the awaiting task was cancelled: the stream ends
            self._end(TIMEOUT)
            self.close()
            raise
        except (RayError, TimeoutError) as exc:
            raise self._failed(exc) from None
        return self._item(value)

    def _item(self, value: Any) -> T:
        if type(value) is Raised:
            self._generator = None
            self._end(ERROR)
            raise value.rebuild()
        return cast(T, value)

    def close(self) -> None:
        """Stop the actor's generator (its ``finally`` runs); idempotent."""
        self._end(OK)  # a stream left early ended as its consumer wished
        generator, self._generator = self._generator, None
        if generator is not None and not generator.is_finished():
            try:
                ray.cancel(generator)
            except (RayError, TaskCancelledError, ValueError):
                pass

    async def aclose(self) -> None:
        """``close()``, for ``async for``'s callers."""
        self.close()

    def __enter__(self) -> RayStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_ON_TIMEOUT = ("abandon", "kill")
_RESTART = ("never", "on-failure")


def check_options(
    *,
    on_timeout: str,
    restart: str,
    max_concurrency: int,
    ray_options: dict[str, Any] | None,
    start_method: object,
    limits: object,
    untrusted: object,
) -> dict[str, Any]:
    """Validate ``spawn()``'s and ``pool()``'s options; the Ray actor options to use."""
    for option, value, off in (
        ("start_method", start_method, None),
        ("limits", limits, None),
        ("untrusted", untrusted, False),
    ):
        if value is not off:
            raise ValueError(
                f"pipe_rpc.ray cannot honour {option}={value!r}: a Ray actor runs in a worker "
                f"process that Ray starts and shares, so {option} must stay {off!r}"
            )
    if on_timeout not in _ON_TIMEOUT:
        raise ValueError(f"on_timeout must be one of {_ON_TIMEOUT}, got {on_timeout!r}")
    if restart not in _RESTART:
        raise ValueError(f"restart must be one of {_RESTART}, got {restart!r}")
    check_max_concurrency(max_concurrency)
    options = dict(ray_options or {})
    reserved = sorted(RESERVED_OPTIONS & options.keys())
    if reserved:
        raise ValueError(
            f"ray_options may not set {', '.join(reserved)}: spawn()'s own options decide them"
        )
    return options


def spawn(
    factory: Callable[[], T],
    /,
    *,
    timeout: float | None = None,
    on_timeout: OnTimeout = "abandon",
    restart: RestartPolicy = "never",
    max_concurrency: int = 1,
    name: str | None = None,
    ray_options: dict[str, Any] | None = None,
    start_timeout: float | None = None,
    start_method: None = None,
    limits: None = None,
    untrusted: Literal[False] = False,
) -> Server[T]:
    """Start ``factory()`` on a Ray actor and return the handle to it, a ``pipe_rpc.Server``.

    Uses the Ray cluster this program has joined, or starts a local one
    (``ray.init()``). Returns once the service is built and answering.

    Args:
        factory: called once on the actor to build the service.
        timeout: default seconds for every call (``None``: no bound, but a
            dead actor still fails the call at once).
        on_timeout: ``"abandon"`` the call, or ``"kill"`` the actor.
        restart: ``"on-failure"`` replaces a dead actor before the next call.
        max_concurrency: Ray's ``max_concurrency`` of the actor (threads).
        name: a label shown in ``repr()``.
        ray_options: passed to the actor class's ``.options()``
            (``num_cpus``, ``resources``, ``runtime_env``, ...), except the
            three that the options above decide.
        start_timeout: seconds to wait for the actor and the factory.
        start_method: must stay ``None``; Ray starts the worker processes.
        limits: must stay ``None``; Ray's workers are shared processes.
        untrusted: must stay ``False``; Ray unpickles everything it carries.

    Raises:
        ValueError: an option is out of range, or cannot be honoured on Ray.
        StartupError: the factory raised, or the actor did not start.
    """
    options = check_options(
        on_timeout=on_timeout,
        restart=restart,
        max_concurrency=max_concurrency,
        ray_options=ray_options,
        start_method=start_method,
        limits=limits,
        untrusted=untrusted,
    )
    start_timeout = check_timeout(start_timeout, "start_timeout")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    return RayServer(
        factory,
        timeout=timeout,
        on_timeout=on_timeout,
        restart=restart,
        max_concurrency=max_concurrency,
        name=name,
        ray_options=options,
        start_timeout=start_timeout,
    )
