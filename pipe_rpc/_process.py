"""``spawn()`` and ``Server[T]``: a service in a child process, its start, restart and close.

Theory of operation. A ``Server`` pickles its factory once, then starts
children from it: each start makes a pipe and a ``ChildStderr``, starts the
process (which runs ``_child.child_main``), and wraps it as a ``Child``
(``_child_handle``) with the ``Client`` that talks to it; the child's hello
ends the start. A pool starts many children at once by taking the two steps
apart (``_start(False)``, then ``_greet``). The current child sits in a
``ServerHandle``, which a finalizer and the exit hook can stop without the
server. Calls go through ``ServerCalls`` (``_server_calls``), which finds the
live child for each and restarts a dead one when the policy says so.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._child import PARENT_ENDS, child_main
from ._child_handle import (
    LIVE,
    Child,
    GuardedProcess,
    ServerHandle,
    death_hint,
    log,
)
from ._client import Client
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    PipeRPCError,
    StartupError,
    describe_exitcode,
)
from ._liveness import fork_generation, wait_readable
from ._options import OnTimeout as OnTimeout  # (re-exported: the names' old home)
from ._options import RestartPolicy as RestartPolicy
from ._options import ServerOptions, server_options
from ._options import StartMethod as StartMethod
from ._proxy import DEFAULT, Proxy
from ._scripts import main_for_children, missing_guard_message, unguarded_main_call
from ._server_calls import ServerCalls
from ._stats import Counters, snapshot
from ._stderr import ChildStderr

if TYPE_CHECKING:
    from ._limits import Limits
    from ._stats_types import Stats

T = TypeVar("T")


#: ``max_reply_bytes`` when ``untrusted=True`` and none is given.
DEFAULT_UNTRUSTED_MAX_REPLY = 64 << 20


def default_start_method() -> StartMethod:
    """``forkserver`` where the platform has it (never forks a threaded parent), else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _preload_in_forkserver(context: Any) -> None:
    """Have the forkserver import pipe_rpc once, so its children do not import it on each spawn.

    Only takes effect if the forkserver has not started yet; the modules it already
    preloads (``__main__`` by default) are kept.
    """
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    if "pipe_rpc" not in current:
        with contextlib.suppress(Exception):
            context.set_forkserver_preload([*current, "pipe_rpc"])


class Server(ServerCalls, Generic[T]):
    """The handle to a service running in a child process; made by ``spawn()``.

    ``proxy`` is typed as the service. With ``restart="on-failure"`` the same
    proxy keeps working across restarts.
    """

    def __init__(
        self,
        factory: Callable[[], T],
        options: ServerOptions,
        *,
        wait: bool = True,
    ) -> None:
        self.timeout = options.timeout
        self._method: StartMethod = options.start_method or default_start_method()
        self._context: Any = multiprocessing.get_context(self._method)
        if self._method == "forkserver":
            _preload_in_forkserver(self._context)
        self._server_options = options
        import cloudpickle

        try:
            self._factory_blob = cloudpickle.dumps(factory, 5)
            # Cloudpickled, so that classes of a script read from stdin reach the child too.
            self._allowed_blob = cloudpickle.dumps(self._server_options.allowed_types, 5)
        except Exception as exc:
            raise PipeRPCError(f"the factory could not be pickled: {exc!r}") from exc
        self._generation = fork_generation()
        self._counters = Counters()
        self._handle = ServerHandle()
        LIVE.add(self._handle)
        finalizer = weakref.finalize(self, ServerHandle.shutdown, self._handle, 1.0)
        finalizer.atexit = False  # at exit, _stop_all_at_exit stops every child together
        self.proxy: T = cast(T, Proxy(self, DEFAULT))
        with self._handle.lock:
            self._start(wait)

    # -- the child ----------------------------------------------------------

    def _start(self, wait: bool = True) -> None:
        """Start a child; with ``wait``, return once it has answered (else see ``_greet``)."""
        previous = self._handle.child
        parent_end, process, stderr = self._launch()
        guarded = GuardedProcess(process)
        max_reply = self._server_options.max_reply_bytes
        if max_reply is None and self._server_options.untrusted:
            max_reply = DEFAULT_UNTRUSTED_MAX_REPLY
        client: Client[Any] = Client(
            parent_end,
            timeout=self.timeout,
            process=guarded,
            untrusted=self._server_options.untrusted,
            allowed_types=self._server_options.allowed_types,
            max_reply_bytes=max_reply,
        )
        client.death_hint = death_hint(self._server_options.limits, stderr)
        client.death_tail = stderr.tail
        child = Child(guarded, client, stderr, self._method)
        child.fd = parent_end.fileno()
        child.counters = self._counters
        client._core.counters = self._counters
        self._counters.started(restart=previous is not None)
        self._handle.child = child
        if wait:
            self._greet(self._server_options.start_timeout, previous)

    def _launch(self) -> tuple[Connection, BaseProcess, ChildStderr]:
        """Start the child process: the parent's end of its pipe, the process, its stderr."""
        parent_end, child_end = self._context.Pipe(duplex=True)
        PARENT_ENDS.add(parent_end)
        stderr = ChildStderr()
        stderr.watch()
        process = self._context.Process(
            target=child_main,
            args=(
                child_end,
                self._factory_blob,
                os.getpid(),
                self._server_options.limits,
                self._server_options.max_concurrency,
                self._server_options.untrusted,
                self._allowed_blob,
                stderr.child_end,
            ),
            name=self._server_options.name or "pipe_rpc-server",
            daemon=False,
        )
        try:
            with main_for_children(self._method):
                process.start()
        finally:
            child_end.close()
            stderr.child_end.close()  # the pipe ends when the child (and its children) end
        return parent_end, process, stderr

    # A start in two steps, for a pool that starts its children at once: ``_start(False)``,
    # then ``_greet`` once ``_answered`` says the child has said something.

    def _answered(self, timeout: float = 0.0) -> bool:
        """Whether ``_greet`` would return at once: the hello, a failure or the end is in."""
        child = self._handle.child
        return child is None or wait_readable(child.fd, timeout) or child.sentinel_fired()

    def _ended(self) -> bool:
        """One poll of the child's sentinel (``is_alive`` may ask multiprocessing, at a cost)."""
        child = self._handle.child
        return child is None or child.sentinel_fired()

    def _greet(self, timeout: float | None, previous: Child | None = None) -> None:
        """Wait up to ``timeout`` s for the child's hello; stop it and raise ``StartupError``
        if the factory failed, the child died, or the time ran out."""
        child = self._handle.child
        assert child is not None
        try:
            child.client.wait_ready(timeout)
        except StartupError:
            child.stop(graceful=1.0)
            raise
        except CallTimeoutError:
            child.stop(graceful=0)
            limit = self._server_options.start_timeout
            raise StartupError(
                f"the factory did not finish within start_timeout={limit} s; "
                f"server process {child.pid} was killed"
            ) from None
        except PipeRPCError as exc:
            child.stop(graceful=0)
            if self._method != "fork" and (where := unguarded_main_call()) is not None:
                raise StartupError(missing_guard_message(where, str(exc))) from None
            raise StartupError(f"the child failed while starting: {exc}") from exc
        if previous is None:
            log().info("server process %d started (start method %s)", child.pid, self._method)
        else:
            log().info(
                "server process %d restarted as %d (start method %s)",
                previous.pid,
                child.pid,
                self._method,
            )

    # -- public -------------------------------------------------------------

    def stats(self) -> Stats:
        """A frozen snapshot of this server's counts, over all its children so far.

        Per method: calls, errors, timeouts, calls in flight and the latency of
        recent calls; and the children started, restarted, and dead by reason.

        Example::

            add = server.stats().methods["add"]
            print(add.calls, add.p50_us)
        """
        return snapshot([self._counters])

    @property
    def pid(self) -> int | None:
        """The current child's pid."""
        child = self._handle.child
        return None if child is None else child.pid

    @property
    def exitcode(self) -> int | None:
        """The current child's exit code, ``None`` while it runs."""
        child = self._handle.child
        if child is None:
            return None
        if child.exitcode is None and child.has_ended():
            child._join(1.0)
        return child.exitcode

    @property
    def start_method(self) -> StartMethod:
        """The start method the children are made with."""
        return self._method

    def is_alive(self) -> bool:
        """Whether the current child is running."""
        child = self._handle.child
        return child is not None and not child.has_ended()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child: ask it, wait up to ``timeout`` s, then SIGTERM, then SIGKILL; reap it.

        Idempotent; calls in flight fail with ``ClientClosedError``.
        """
        self._handle.shutdown(graceful=timeout)

    def kill(self) -> None:
        """Kill the child now (SIGTERM, then SIGKILL after a short grace, its whole group)."""
        with self._handle.lock:
            child = self._handle.child
        if child is not None:
            child.stop(graceful=0)

    def restart(self) -> None:
        """Replace the child with a fresh one from the factory."""
        with self._handle.lock:
            if self._handle.closed:
                raise ClientClosedError("the server was closed")
            child = self._handle.child
            if child is not None:
                child.stop(graceful=0)
            self._start()

    def __enter__(self) -> T:
        if self._handle.closed:
            raise ClientClosedError("the server was closed")
        return self.proxy

    async def __aenter__(self) -> T:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close()`` without blocking the event loop (it runs on a worker thread)."""
        import asyncio

        await asyncio.to_thread(self.close, timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else describe_exitcode(self.exitcode)
        return f"<pipe_rpc.Server pid={self.pid} {state}>"


def spawn(
    factory: Callable[[], T],
    /,
    *,
    timeout: float | None = None,
    start_method: StartMethod | None = None,
    on_timeout: OnTimeout = "abandon",
    restart: RestartPolicy = "never",
    max_concurrency: int = 1,
    limits: Limits | None = None,
    untrusted: bool = False,
    name: str | None = None,
    allowed_types: Iterable[type] = (),
    max_reply_bytes: int | None = None,
    start_timeout: float | None = None,
) -> Server[T]:
    """Start ``factory()`` in a child process and return the handle to it.

    Returns once the service is built and has answered the handshake. The
    handle's ``proxy`` (and the target of ``with spawn(...) as proxy:``) is typed
    as the service.

    Args:
        factory: called once in the child to build the service: a class, a
            ``functools.partial``, a lambda or a closure (it travels with cloudpickle).
        timeout: default seconds for every call (``None``: no bound; a dead child
            still fails a call at once).
        start_method: ``"fork"``, ``"forkserver"`` or ``"spawn"``; ``None`` is
            ``forkserver`` where the platform has it, else ``spawn``.
        on_timeout: ``"abandon"`` (the child goes on; the late reply is dropped) or
            ``"kill"`` (the child's process group is killed).
        restart: ``"never"``, or ``"on-failure"``: the next call after a death
            starts a fresh child from the same factory (a call in flight is never
            retried).
        max_concurrency: how many calls may run at once in the child (threads;
            ``async def`` methods run as tasks on one event loop).
        limits: ``Limits`` applied in the child before the factory runs.
        untrusted: decode everything from the child with the restricted decoder.
        name: the child process's name.
        allowed_types: with ``untrusted``, the types a reply may hold besides
            plain data (``pipe_rpc.SAFE_TYPES`` offers the safe standard ones).
        max_reply_bytes: refuse replies larger than this (``ProtocolError``);
            64 MiB by default with ``untrusted``.
        start_timeout: seconds to wait for the factory (here and on a restart);
            past it the child is killed and ``StartupError`` says so.

    Returns:
        The ``Server`` handle: ``.proxy``, ``.pid``, ``.stats()``, ``.close()``...

    Raises:
        ValueError: an option is out of range.
        TypeError: ``factory`` is not callable.
        StartupError: the factory raised (its traceback is the ``__cause__``), the
            child died while starting (a script with no main guard is named), or
            ``start_timeout`` passed.

    Example::

        with pipe_rpc.spawn(Calculator, timeout=5.0) as calc:
            assert calc.add(1, 2) == 3
    """
    options = server_options(
        factory,
        timeout=timeout,
        start_method=start_method,
        on_timeout=on_timeout,
        restart=restart,
        max_concurrency=max_concurrency,
        limits=limits,
        untrusted=untrusted,
        name=name,
        allowed_types=allowed_types,
        max_reply_bytes=max_reply_bytes,
        start_timeout=start_timeout,
    )
    return Server(factory, options)
