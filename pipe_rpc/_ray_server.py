"""``pipe_rpc.ray.spawn()`` and ``RayServer``: one service on one Ray actor.

Theory of operation. A ``RayServer`` is a ``pipe_rpc.Server`` whose child is
an ``Actor`` (``_ray_handle``): Ray never restarts it or retries a call on its
own, so replacing a dead actor (``restart="on-failure"``) is done here, between
calls, with the same factory (``_live``). Calls go through ``RayCalls``
(``_ray_calls``), which turns Ray's errors into pipe_rpc's; generator methods
are ``RayStream``s (``_ray_stream``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal, NoReturn, TypeVar, cast

from ._errors import ClientClosedError, WorkerDiedError
from ._process import Server
from ._proxy import DEFAULT, Proxy, check_timeout
from ._ray_calls import OnTimeout, RayCalls
from ._ray_handle import Actor, Holder, finish_close, kill_actor
from ._ray_stream import RayStream as RayStream  # (re-exported: pipe_rpc.ray's)
from ._server import check_max_concurrency
from ._stats import Counters, snapshot
from ._stats_types import Stats

T = TypeVar("T")

RestartPolicy = Literal["never", "on-failure"]

#: Actor options that ``spawn()``'s own arguments decide; ``ray_options`` may not set them.
RESERVED_OPTIONS = frozenset({"max_concurrency", "max_restarts", "max_task_retries"})


class RayServer(RayCalls, Server[T]):
    """The handle to a service on a Ray actor; made by ``pipe_rpc.ray.spawn()``.

    A ``pipe_rpc.Server`` (``isinstance`` holds, and mypy sees ``Server[T]``)
    whose child is a Ray actor. ``Server.__init__`` is not called: it starts a
    ``multiprocessing`` child, and every method that would touch that child is
    overridden, here or in ``RayCalls``. ``exitcode`` is always ``None``: Ray does not report an
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
        self._holder = Holder()
        # A server dropped without close() takes its actor with it (the watch task
        # would keep an actor whose handles are all gone alive).
        weakref.finalize(self, Holder.kill, self._holder)
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

    def stats(self) -> Stats:
        """A frozen snapshot of this server's counts: calls of every kind (a stream is
        one call), starts, restarts, and deaths by the reason Ray's message gives
        (``"unknown"`` when it names no exit code; ``"SIGKILL"`` for a kill)."""
        return snapshot([self._counters])

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close()`` without blocking the event loop (it runs on a worker thread)."""
        await asyncio.to_thread(self.close, timeout)

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
            kill_actor(actor.handle)
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
