"""``spawn()`` and ``Server[T]``: a service in a child process, its death, kill and restart.

The child runs ``_child_main``: it leads a process group of its own (so a
kill takes its grandchildren too), closes the parent ends of other servers'
pipes it inherited under ``fork`` (so a sibling's death is never masked),
starts a thread that ends the group if our process dies, applies the
``Limits``, builds the service from the cloudpickled factory and serves it.
A factory that raises sends ``StartupFailed`` instead of the hello. Its
standard error is a pipe that the parent drains (``_stderr``).

Logger ``"pipe_rpc"``: INFO when a child starts, is restarted or closed,
WARNING when one is seen dead or is killed for a timeout; nothing per call.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import functools
import multiprocessing
import os
import pickle
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._client import Client
from ._codec import Codec
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    PipeRPCError,
    ProtocolError,
    StartupError,
    WorkerDiedError,
    describe_exitcode,
)
from ._liveness import (
    GENERATION,
    check_owner,
    close_inherited_now,
    fork_generation,
    register_holder,
    wait_readable,
)
from ._messages import Kind, StartupFailed
from ._options import OnTimeout as OnTimeout  # (re-exported: the names' old home)
from ._options import RestartPolicy as RestartPolicy
from ._options import ServerOptions, server_options
from ._options import StartMethod as StartMethod
from ._proxy import DEFAULT, Proxy, fresh_error
from ._scripts import main_for_children, missing_guard_message, unguarded_main_call
from ._server import serve
from ._stats import Counters, snapshot
from ._stderr import ChildStderr, adopt_in_child
from ._transport import Transport

if TYPE_CHECKING:  # imported when used: the child needs attrs only when given limits
    import logging
    from concurrent.futures import Future

    from ._limits import Limits
    from ._stats_types import Stats

T = TypeVar("T")


#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 0.25
#: ``max_reply_bytes`` when ``untrusted=True`` and none is given.
DEFAULT_UNTRUSTED_MAX_REPLY = 64 << 20

# The parent ends of live servers' pipes; a child started by fork closes them all.
_PARENT_ENDS: weakref.WeakSet[Connection] = weakref.WeakSet()


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


def _child_main(
    conn: Connection,
    factory_blob: bytes,
    parent_pid: int,
    limits: Limits | None,
    max_concurrency: int,
    untrusted: bool = False,
    allowed_blob: bytes | None = None,
    stderr_end: Connection | None = None,
) -> None:
    """The child process: set up isolation, build the service, serve it."""
    if stderr_end is not None:
        adopt_in_child(stderr_end)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for end in list(_PARENT_ENDS):
        if end is not conn:
            end.close()
    close_inherited_now()
    _watch_parent(parent_pid)
    try:
        if limits is not None:
            limits.apply()
        factory = pickle.loads(factory_blob)
        service = factory()
    except BaseException as exc:
        transport = Transport(conn)
        with contextlib.suppress(OSError, Exception):
            transport.write(Codec().encode(StartupFailed(exc)))
        conn.close()
        sys.exit(1)
    allowed_types = () if allowed_blob is None else pickle.loads(allowed_blob)
    serve(
        service,
        conn,
        max_concurrency=max_concurrency,
        untrusted=untrusted,
        allowed_types=allowed_types,
    )


def _watch_parent(parent_pid: int) -> None:
    """End this process group soon after ``parent_pid`` ends, even mid-call.

    A bare ``_thread`` thread: ``threading.Thread.start()`` waits until the new
    thread has run, which cost most of a millisecond of every start here.
    """
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or the parent is gone
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            poll.poll()
        else:  # look twice a second
            while _pid_exists(parent_pid):
                time.sleep(0.5)
        _end_group()

    _thread.start_new_thread(watch, ())


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group() -> None:
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)


def _signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the child's process group, or to the child alone if it has none yet."""
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class _GuardedProcess:
    """A process handle whose exit status may be asked for from several threads.

    ``Popen.poll`` under ``forkserver`` reads the exit status from the sentinel
    once; a second thread reading at the same time finds end of file and
    records 255. One lock around ``exitcode``, ``join`` and ``close`` prevents it.
    Once closed it answers with what it last knew, never with ``ValueError``:
    a thread of an old client may still ask after a restart closed it.

    Where the platform has them, ``sentinel`` is a pidfd, readable once the
    process has ended. ``multiprocessing``'s own sentinel is a pipe that the
    child's forked children inherit: while one of them lives, it never fires.
    """

    def __init__(self, process: BaseProcess) -> None:
        self._process = process
        self._lock = threading.Lock()
        self._closed = False
        self._exitcode: int | None = None
        self.pid = process.pid
        try:
            self._pidfd: int | None = os.pidfd_open(process.pid)  # type: ignore[arg-type]
        except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
            self._pidfd = None
        self._sentinel = process.sentinel if self._pidfd is None else self._pidfd
        register_holder(self)

    def close_inherited(self) -> None:
        """In a forked child: this process is not the child's parent, so multiprocessing
        must not try to join it at exit."""
        self._lock = threading.Lock()
        self._closed = True
        children = getattr(multiprocessing.process, "_children", None)
        if children is not None:
            children.discard(self._process)

    @property
    def sentinel(self) -> int:
        """Readable once the process has ended (-1 once closed)."""
        return -1 if self._closed else self._sentinel

    @property
    def exitcode(self) -> int | None:
        with self._lock:
            if not self._closed:
                self._exitcode = self._process.exitcode
            return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        if self._pidfd is None:
            with self._lock:
                if not self._closed:
                    self._process.join(timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if not wait_readable(self._pidfd, timeout):
            return
        with self._lock:
            if not self._closed and self._process.exitcode is None:
                # forkserver: its server reports the status
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._process.join(left)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._exitcode = self._process.exitcode
            self._process.close()
            self._closed = True
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


class _Child:
    """One child process, the client talking to it, and its standard error."""

    fd = -1  # the parent end's descriptor: readable once the hello (or a failure) is in

    def __init__(
        self,
        process: _GuardedProcess,
        client: Client[Any],
        stderr: ChildStderr | None = None,
        method: str = "",
    ) -> None:
        self.process = process
        self.client = client
        self.core = client._core  # the connection, read on every call
        self.pid = cast(int, process.pid)
        self.exitcode: int | None = None
        self.generation = fork_generation()
        self.ended = False  # has_ended() saw it end
        self.counters: Counters | None = None  # the server's, which counts its deaths
        self._local = threading.local()
        self.stderr = stderr
        self.method = method
        self.stopping = False  # stop() began: an end from then on is ours, not news
        self.death_logged = False

    def sentinel_fired(self) -> bool:
        """Has the process ended? One ``poll`` of its sentinel."""
        if self.process.sentinel < 0:  # closed by a restart in another thread
            return True
        # A poll object per thread: one select.poll may not be polled by two threads at once.
        poll: select.poll | None = getattr(self._local, "poll", None)
        if poll is None:
            poll = self._local.poll = select.poll()
            poll.register(self.process.sentinel, select.POLLIN)
        return bool(poll.poll(0))

    def has_ended(self) -> bool:
        if self.ended or self.exitcode is not None or self.sentinel_fired():
            self.ended = True  # the next call takes the slow path, whatever the watcher saw yet
            return True
        # Under forkserver the sentinel carries the exit status; once a join has read
        # it the sentinel may look quiet, but the process object remembers the code.
        with contextlib.suppress(ValueError):
            self.exitcode = self.process.exitcode
        return self.exitcode is not None

    def stop(self, graceful: float) -> None:
        """Stop the child and reap it.

        With ``graceful > 0`` (``close()``) the client is closed first, which asks
        the child to stop and fails calls in flight with ``ClientClosedError``;
        after ``graceful`` seconds it is SIGTERM, then SIGKILL. With 0 (a kill)
        the signals come first and calls in flight get ``WorkerDiedError``.
        """
        if self.generation != fork_generation():  # a forked copy: not ours to stop
            return
        died = not self.stopping and self.has_ended()
        self.stopping = True
        if graceful > 0:
            self.client.close()
            self._join(graceful)
        if self.exitcode is None:
            _signal_group(self.pid, signal.SIGTERM)
            self._join(KILL_GRACE)
        if self.exitcode is None:
            _signal_group(self.pid, signal.SIGKILL)
            self._join(5.0)
        _signal_group(self.pid, signal.SIGKILL)  # grandchildren left in the group
        self.client.connection_lost("the server process was killed")
        self.client.close()
        if self.exitcode is not None:
            with contextlib.suppress(ValueError):
                self.process.close()
        if self.stderr is not None:  # its last words reach our stderr before we return
            self.stderr.finish()
        if died:
            self._log_death()

    def note_death(self, error: BaseException) -> None:
        """``error`` came of this child's death: give it the stderr tail, log the death once."""
        if not isinstance(error, WorkerDiedError):
            return
        if self.stderr is not None:
            error.stderr_tail = self.stderr.tail()
        if not self.stopping:
            self._log_death(error.exitcode)

    def _log_death(self, exitcode: int | None = None) -> None:
        if self.death_logged:
            return
        self.death_logged = True
        if exitcode is None:
            exitcode = self.exitcode
        if self.counters is not None:
            self.counters.died(_reason(exitcode))
        last = ""
        if self.stderr is not None:
            self.stderr.finish()
            last = self.stderr.last_line()
        _log().warning(
            "server process %d died: %s (exit code %s); last line on its stderr: %r",
            self.pid,
            _reason(exitcode),
            exitcode,
            last,
        )

    def _join(self, timeout: float) -> None:
        with contextlib.suppress(ValueError, AssertionError):
            self.process.join(timeout)
            self.exitcode = self.process.exitcode


def _death_hint(limits: Limits | None, stderr: ChildStderr) -> Callable[[int], str]:
    """The client's ``death_hint``: the limits' guess, then the end of the child's stderr.

    It holds the limits' own method, not the server's: a method of the server would
    keep it alive through the handle, which its finalizer holds, and it would never
    be collected.
    """
    explain = None if limits is None else limits.explain

    def hint(exitcode: int) -> str:
        return ("" if explain is None else explain(exitcode)) + stderr.death_note()

    return hint


_LOGGER: logging.Logger | None = None


def _log() -> logging.Logger:
    """The ``"pipe_rpc"`` logger, importing ``logging`` on first use: a child never needs it.

    A library's logger gets a ``NullHandler``, so that a program that has not set up
    logging does not get our warnings printed by logging's last-resort handler.
    """
    global _LOGGER
    if _LOGGER is None:
        import logging

        logger = logging.getLogger("pipe_rpc")
        logger.addHandler(logging.NullHandler())
        _LOGGER = logger
    return _LOGGER


def _reason(exitcode: int | None) -> str:
    """A death's reason in a word: ``"SIGSEGV"``, ``"exit 3"``."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        return describe_exitcode(exitcode).removeprefix("killed by ")
    return f"exit {exitcode}"


class _Handle:
    """What must be cleaned up for a ``Server``, kept apart so GC and exit can do it."""

    def __init__(self) -> None:
        self.child: _Child | None = None
        self.lock = threading.RLock()
        self.closed = False

    def shutdown(self, graceful: float) -> None:
        with self.lock:
            was_closed = self.closed
            self.closed = True
            child = self.child
        if child is not None:
            child.stop(graceful)
            if not was_closed and child.generation == fork_generation():
                _log().info(
                    "server process %d closed: %s (start method %s)",
                    child.pid,
                    describe_exitcode(child.exitcode),
                    child.method,
                )


_LIVE: weakref.WeakSet[_Handle] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: our
    # non-daemonic children are gone before multiprocessing would join them.
    children: list[_Child] = []
    for handle in list(_LIVE):
        with handle.lock:
            handle.closed = True
            child = handle.child
        if child is not None and child.generation == fork_generation():
            children.append(child)
    _stop_together(children, graceful=1.0)


def _stop_together(children: list[_Child], graceful: float) -> None:
    """Stop every child at once: the whole takes about one grace, not one per child.

    Each step (ask, SIGTERM, SIGKILL) goes to all of them before any wait, and the
    waits share one deadline; then each is reaped and closed as ``stop`` does.
    """
    for child in children:
        with contextlib.suppress(Exception):
            child.client.close()  # asks the child to stop; calls in flight fail
    _join_all(children, graceful)
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        left = [child for child in children if child.exitcode is None]
        for child in left:
            _signal_group(child.pid, sig)
        _join_all(left, wait)
    for child in children:
        child.stop(graceful=0)  # reaps what is left and closes the handles, at once now


def _join_all(children: list[_Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        if child.exitcode is None:
            child._join(max(0.0, deadline - time.monotonic()))


class Server(Generic[T]):
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
        self._handle = _Handle()
        _LIVE.add(self._handle)
        finalizer = weakref.finalize(self, _Handle.shutdown, self._handle, 1.0)
        finalizer.atexit = False  # at exit, _stop_all_at_exit stops every child together
        self.proxy: T = cast(T, Proxy(self, DEFAULT))
        with self._handle.lock:
            self._start(wait)

    # -- the child ----------------------------------------------------------

    def _start(self, wait: bool = True) -> None:
        """Start a child; with ``wait``, return once it has answered (else see ``_greet``)."""
        previous = self._handle.child
        parent_end, child_end = self._context.Pipe(duplex=True)
        _PARENT_ENDS.add(parent_end)
        stderr = ChildStderr()
        stderr.watch()
        process = self._context.Process(
            target=_child_main,
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
        guarded = _GuardedProcess(process)
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
        client.death_hint = _death_hint(self._server_options.limits, stderr)
        client.death_tail = stderr.tail
        child = _Child(guarded, client, stderr, self._method)
        child.fd = parent_end.fileno()
        child.counters = self._counters
        client._core.counters = self._counters
        self._counters.started(restart=previous is not None)
        self._handle.child = child
        if wait:
            self._greet(self._server_options.start_timeout, previous)

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

    def _greet(self, timeout: float | None, previous: _Child | None = None) -> None:
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
            _log().info("server process %d started (start method %s)", child.pid, self._method)
        else:
            _log().info(
                "server process %d restarted as %d (start method %s)",
                previous.pid,
                child.pid,
                self._method,
            )

    def _current(self) -> _Child:
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
        try:
            return child.client.invoke(method, args, kwargs, timeout)
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

    def _cancelled(self, child: _Child, method: str) -> None:
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

    def _stream_failed(self, child: _Child, method: str, exc: BaseException) -> None:
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

    def _child_for_call(self) -> _Child:
        if self._generation != fork_generation():
            check_owner(self._generation, "server")
        return self._current()

    def _failed(self, child: _Child, exc: PipeRPCError, method: str) -> None:
        """A call of ``method`` on ``child`` failed with ``exc``: kill the child if that
        is the policy."""
        if isinstance(exc, ProtocolError):
            child.stop(graceful=0)
        elif self._server_options.on_timeout == "kill":
            _log().warning(
                "server process %d: %s() timed out; killing it (on_timeout='kill')",
                child.pid,
                method,
            )
            child.stop(graceful=0)

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
