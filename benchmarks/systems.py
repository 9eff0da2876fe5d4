"""The systems under test built on the standard library and pipe_rpc.

Every system starts one child process serving :class:`Service` and offers the same
calls (``add``, ``echo``, ``boom``, ``wait``, ``crash``, ``getpid``), a way to start
and close its child with a given start method, and a way to recover after its child
died.  The optional peers (RPyC, Pyro5) are in ``peers.py``.  This module is imported
by children started with "spawn" or "forkserver", so it imports only the standard
library at import time (pipe_rpc is imported when a PipeRpc system starts).
"""

from __future__ import annotations

import glob
import importlib
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.managers import BaseManager
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from benchmarks.service import (
    WAIT_SECONDS,
    Service,
    call_service,
    die_with_parent,
    raw_loop_a,
    raw_loop_b,
)

if TYPE_CHECKING:
    import pipe_rpc

#: How long any single blocking step outside a measured call may take (joins, shutdowns).
STEP_TIMEOUT = 10.0
#: Upper bound on one call whose reply we wait for without a per-call timeout option.
CALL_TIMEOUT = WAIT_SECONDS + 30.0

_SOCKET_DIR: str | None = None

StartMethod = Literal["fork", "forkserver", "spawn"]


def start_method(name: str) -> StartMethod:
    if name == "fork":
        return "fork"
    if name == "forkserver":
        return "forkserver"
    if name == "spawn":
        return "spawn"
    raise ValueError(f"unknown start method {name!r}")


def context(name: str) -> ForkContext | ForkServerContext | SpawnContext:
    """The multiprocessing context of a start method, typed precisely."""
    method = start_method(name)
    if method == "fork":
        return mp.get_context("fork")
    if method == "forkserver":
        return mp.get_context("forkserver")
    return mp.get_context("spawn")


def socket_dir() -> str:
    """A private folder for unix sockets, removed by :func:`remove_socket_dir`.

    Its name holds our pid, so folders left by a runner that was killed are removed
    the next time (when their pid is gone).
    """
    global _SOCKET_DIR
    if _SOCKET_DIR is None:
        base = tempfile.gettempdir()
        for old in glob.glob(os.path.join(base, "pipe_rpc_bench_*_*")):
            pid = os.path.basename(old).split("_")[3]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(old, ignore_errors=True)
        _SOCKET_DIR = tempfile.mkdtemp(prefix=f"pipe_rpc_bench_{os.getpid()}_")
    return _SOCKET_DIR


def remove_socket_dir() -> None:
    global _SOCKET_DIR
    if _SOCKET_DIR is not None:
        shutil.rmtree(_SOCKET_DIR, ignore_errors=True)
        _SOCKET_DIR = None


def stop_process(process: BaseProcess | None, grace: float = 2.0) -> None:
    """Join a child for ``grace`` seconds, then terminate, then kill it: every step bounded.

    The grace is short on purpose: with "fork", a sibling started later may hold a copy
    of our end of a pipe or socket, so a child may never see end-of-file by itself.
    """
    if process is None or process.pid is None:
        return
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(STEP_TIMEOUT / 2)
    if process.is_alive():
        process.kill()
        process.join(STEP_TIMEOUT / 2)


class Unavailable(Exception):
    """The system cannot run here; ``str()`` says why ("not installed", ...)."""


class System:
    """Base class: one child process serving :class:`Service`, driven from this process."""

    name: ClassVar[str] = ""
    #: What this system's child loop / transport is, printed under the table.
    note: ClassVar[str] = ""
    #: Whether a 4-thread run needs a lock around each round trip (raw pipes).
    needs_lock: ClassVar[bool] = False
    #: Whether ``echo`` can carry a numpy array by value.
    carries_ndarray: ClassVar[bool] = True
    ndarray_note: ClassVar[str] = ""

    def __init__(self) -> None:
        self.method = ""

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`Unavailable` when the system cannot run in this environment."""

    def start(self, method: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        """Make the next call work again after the child died (what a user would write)."""
        self.close()
        self.start(self.method)

    def restart_hard(self) -> None:
        """Close and start again, whatever state the child is in."""
        self.close()
        self.start(self.method)

    def call(self, name: str, *args: Any) -> Any:
        raise NotImplementedError

    def add(self, a: int, b: int) -> int:
        result: int = self.call("add", a, b)
        return result

    def echo(self, x: Any) -> Any:
        return self.call("echo", x)

    def boom(self) -> None:
        self.call("boom")

    def wait(self) -> None:
        self.call("wait", WAIT_SECONDS)

    def crash(self) -> None:
        self.call("crash")

    def getpid(self) -> int:
        pid: int = self.call("getpid")
        return pid

    def thread_adder(self) -> Callable[[int, int], int]:
        """What one of several threads sharing this system calls (a shared proxy by default)."""
        return self.add

    def release_thread(self) -> None:
        """Called by a worker thread when it is done with :meth:`thread_adder`."""


class _RawSystem(System):
    needs_lock = True

    @staticmethod
    def _loop() -> Callable[[Connection, Connection | None, int], None]:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None

    def start(self, method: str) -> None:
        self.method = method
        ctx = context(method)
        parent_end, child_end = ctx.Pipe()
        # Only a forked child inherits (and must close) our end; elsewhere it is not passed.
        process = ctx.Process(
            target=self._loop(),
            args=(child_end, parent_end if method == "fork" else None, os.getpid()),
            daemon=True,
            name=f"bench-{self.name}",
        )
        process.start()
        child_end.close()
        self._conn, self._process = parent_end, process

    def close(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            try:
                self._send_stop(conn)
            except OSError:
                pass
            conn.close()
        stop_process(process)

    def _send_stop(self, conn: Connection) -> None:
        raise NotImplementedError


class RawA(_RawSystem):
    name = "raw A"
    note = "hand loop: conn.send((name, args)) / conn.recv() in the child"

    @staticmethod
    def _loop() -> Callable[[Connection, Connection | None, int], None]:
        return raw_loop_a

    def call(self, name: str, *args: Any) -> Any:
        conn = self._conn
        assert conn is not None
        conn.send((name, args))
        ok, value = conn.recv()
        if ok:
            return value
        raise value

    def add(self, a: int, b: int) -> int:  # the measured call, written out as a hand loop would
        conn = self._conn
        assert conn is not None
        conn.send(("add", (a, b)))
        ok, value = conn.recv()
        if ok:
            result: int = value
            return result
        raise value

    def _send_stop(self, conn: Connection) -> None:
        conn.send(None)


class RawB(_RawSystem):
    name = "raw B"
    note = "hand loop: send_bytes(pickle.dumps(msg, protocol=5)) / pickle.loads(recv_bytes())"

    @staticmethod
    def _loop() -> Callable[[Connection, Connection | None, int], None]:
        return raw_loop_b

    def call(self, name: str, *args: Any) -> Any:
        conn = self._conn
        assert conn is not None
        conn.send_bytes(pickle.dumps((name, args), protocol=5))
        ok, value = pickle.loads(conn.recv_bytes())
        if ok:
            return value
        raise value

    def add(self, a: int, b: int) -> int:  # the measured call, written out as a hand loop would
        conn = self._conn
        assert conn is not None
        conn.send_bytes(pickle.dumps(("add", (a, b)), protocol=5))
        ok, value = pickle.loads(conn.recv_bytes())
        if ok:
            result: int = value
            return result
        raise value

    def _send_stop(self, conn: Connection) -> None:
        conn.send_bytes(pickle.dumps(None, protocol=5))


class PipeRpc(System):
    name = "pipe_rpc"
    note = 'pipe_rpc.spawn(Service, restart="on-failure", max_concurrency=1); calls via .proxy'

    def __init__(self) -> None:
        super().__init__()
        self._server: pipe_rpc.Server[Service] | None = None
        self._proxy: Service | None = None

    @classmethod
    def check_available(cls) -> None:
        try:
            module = importlib.import_module("pipe_rpc")
        except Exception as exc:
            raise Unavailable(f"import pipe_rpc failed: {type(exc).__name__}: {exc}") from exc
        if not hasattr(module, "spawn"):
            raise Unavailable("pipe_rpc has no spawn() yet")

    def start(self, method: str) -> None:
        import pipe_rpc

        self.method = method
        server = pipe_rpc.spawn(
            Service, start_method=start_method(method), restart="on-failure", max_concurrency=1
        )
        self._server = server
        self._proxy = server.proxy

    def close(self) -> None:
        server, self._server, self._proxy = self._server, None, None
        if server is None:
            return
        try:
            server.close()
        finally:
            # close() should already have ended the child; kill() makes sure of it.
            try:
                server.kill()
            except Exception:
                pass

    def recover(self) -> None:
        """Nothing to do: with restart="on-failure" the next call starts a fresh child."""

    def server_pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self._proxy, name)(*args)

    # The measured calls go through the typed proxy, as user code would write them.
    def add(self, a: int, b: int) -> int:
        proxy = self._proxy
        assert proxy is not None
        return proxy.add(a, b)

    def echo(self, x: Any) -> Any:
        proxy = self._proxy
        assert proxy is not None
        return proxy.echo(x)

    def boom(self) -> None:
        proxy = self._proxy
        assert proxy is not None
        proxy.boom()


class _BenchManager(BaseManager):
    pass


_BenchManager.register("Service", Service)


class Manager(System):
    name = "mp.Manager"
    note = (
        "multiprocessing.managers.BaseManager serving Service; AutoProxy; "
        "4 threads share one proxy object, which opens one socket per thread"
    )

    def __init__(self) -> None:
        super().__init__()
        self._manager: _BenchManager | None = None
        self._proxy: Any = None

    def start(self, method: str) -> None:
        self.method = method
        manager = _BenchManager(ctx=context(method))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        self._manager = manager
        self._proxy = manager.Service()  # type: ignore[attr-defined]

    def close(self) -> None:
        manager, self._manager, self._proxy = self._manager, None, None
        if manager is not None:
            manager.shutdown()  # bounded: joins 1 s, then terminates

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self._proxy, name)(*args)

    def add(self, a: int, b: int) -> int:
        result: int = self._proxy.add(a, b)
        return result


class PoolExecutor(System):
    name = "ProcessPool"
    note = "concurrent.futures.ProcessPoolExecutor(max_workers=1): submit(fn, ...).result()"

    def __init__(self) -> None:
        super().__init__()
        self._executor: ProcessPoolExecutor | None = None

    def start(self, method: str) -> None:
        self.method = method
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=context(method),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def call(self, name: str, *args: Any) -> Any:
        executor = self._executor
        assert executor is not None
        return executor.submit(call_service, name, *args).result(CALL_TIMEOUT)


#: Raw loop B is the baseline every ratio is computed against; raw loop A the second one.
BASELINE = RawB.name
SECOND_BASELINE = RawA.name
