"""The optional peers: RPyC and Pyro5, each serving :class:`Service` from a child process.

Both packages are imported lazily, so this module imports without them and a missing
one is reported as "not installed".
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from benchmarks.service import Service, die_with_parent
from benchmarks.systems import (
    CALL_TIMEOUT,
    STEP_TIMEOUT,
    System,
    Unavailable,
    context,
    socket_dir,
    stop_process,
)


def rpyc_child(sock: socket.socket, runner_pid: int) -> None:
    """RPyC server side: serve one connection over a socketpair end until it closes."""
    die_with_parent(runner_pid)
    import rpyc
    from rpyc.core import channel
    from rpyc.core.stream import SocketStream

    channel.Channel.COMPRESSION_THRESHOLD = 1 << 62  # never zlib on a local link

    class RpycService(rpyc.Service):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._service = Service()

        def exposed_call(self, name: str, *args: Any) -> Any:
            return getattr(self._service, name)(*args)

        def exposed_add(self, a: int, b: int) -> int:
            return a + b

        def exposed_echo(self, x: Any) -> Any:
            return x

        def exposed_boom(self) -> None:
            self._service.boom()

    conn = rpyc.utils.factory.connect_stream(
        SocketStream(sock), service=RpycService, config={"allow_pickle": False}
    )
    try:
        conn.serve_all()
    finally:
        conn.close()


class Rpyc(System):
    name = "RPyC"
    note = (
        "socketpair + rpyc.utils.factory.connect_stream, child serves with serve_all(); "
        "zlib compression off; bound netrefs cached (conn.root.add(...) inline costs 2 round trips)"
    )
    carries_ndarray = False
    ndarray_note = "an ndarray goes as a netref, not by value"

    def __init__(self) -> None:
        super().__init__()
        self._conn: Any = None
        self._process: BaseProcess | None = None
        self._add: Callable[[int, int], int] | None = None
        self._echo: Callable[[Any], Any] | None = None
        self._boom: Callable[[], None] | None = None
        self._call: Callable[..., Any] | None = None

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("rpyc") is None:
            raise Unavailable("not installed")

    def start(self, method: str) -> None:
        import rpyc
        from rpyc.core import channel
        from rpyc.core.stream import SocketStream

        channel.Channel.COMPRESSION_THRESHOLD = 1 << 62
        self.method = method
        ctx = context(method)
        ours, theirs = socket.socketpair()
        process = ctx.Process(
            target=rpyc_child, args=(theirs, os.getpid()), daemon=True, name="bench-rpyc"
        )
        try:
            process.start()
        finally:
            theirs.close()
        self._process = process
        conn = rpyc.utils.factory.connect_stream(
            SocketStream(ours), config={"sync_request_timeout": CALL_TIMEOUT}
        )
        self._conn = conn
        root = conn.root
        self._add, self._echo, self._boom, self._call = root.add, root.echo, root.boom, root.call

    def close(self) -> None:
        conn, process, self._conn, self._process = self._conn, self._process, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        stop_process(process)

    def call(self, name: str, *args: Any) -> Any:
        assert self._call is not None
        return self._call(name, *args)

    def add(self, a: int, b: int) -> int:
        assert self._add is not None
        return self._add(a, b)

    def echo(self, x: Any) -> Any:
        assert self._echo is not None
        return self._echo(x)

    def boom(self) -> None:
        assert self._boom is not None
        self._boom()


def pyro_child(path: str, ready: Connection, runner_pid: int) -> None:
    """Pyro5 server side: a daemon on a unix socket; sends its URI when listening."""
    die_with_parent(runner_pid)
    import Pyro5.api

    service = Service()

    @Pyro5.api.expose
    class PyroService:
        def call(self, name: str, *args: Any) -> Any:
            return getattr(service, name)(*args)

        def add(self, a: int, b: int) -> int:
            return a + b

        def echo(self, x: Any) -> Any:
            return x

        def boom(self) -> None:
            service.boom()

        def wait(self, seconds: float) -> None:
            service.wait(seconds)

        def crash(self) -> None:
            service.crash()

        def getpid(self) -> int:
            return os.getpid()

    daemon = Pyro5.api.Daemon(unixsocket=path)
    uri = daemon.register(PyroService(), "service")
    ready.send(str(uri))
    ready.close()
    daemon.requestLoop()


class Pyro(System):
    name = "Pyro5"
    note = (
        'Daemon(unixsocket=...) in a child, SERIALIZER "marshal" (fastest of '
        "serpent/marshal/json that carries bytes); threads cannot share a proxy, so each "
        "thread has its own (one socket each)"
    )
    carries_ndarray = False
    ndarray_note = "the marshal serializer cannot carry an ndarray"

    def __init__(self) -> None:
        super().__init__()
        self._process: BaseProcess | None = None
        self._uri = ""
        self._main_proxy: Any = None
        self._local = threading.local()
        self._proxies: list[Any] = []
        self._lock = threading.Lock()

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("Pyro5") is None:
            raise Unavailable("not installed")

    def start(self, method: str) -> None:
        self.method = method
        ctx = context(method)
        path = os.path.join(socket_dir(), f"pyro-{os.getpid()}-{id(self)}-{method}.sock")
        if os.path.exists(path):
            os.unlink(path)
        ours, theirs = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=pyro_child, args=(path, theirs, os.getpid()), daemon=True, name="bench-pyro5"
        )
        process.start()
        theirs.close()
        self._process = process
        if not ours.poll(STEP_TIMEOUT):
            raise RuntimeError("Pyro5 daemon did not report its URI in time")
        self._uri = ours.recv()
        ours.close()
        self._local = threading.local()
        self._main_proxy = self._new_proxy()

    def _new_proxy(self) -> Any:
        import Pyro5.api

        proxy = Pyro5.api.Proxy(self._uri)
        proxy._pyroSerializer = "marshal"
        proxy._pyroBind()  # connect now, not inside the first measured call
        with self._lock:
            self._proxies.append(proxy)
        return proxy

    def _proxy(self) -> Any:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = self._new_proxy()
            self._local.proxy = proxy
        return proxy

    def close(self) -> None:
        with self._lock:
            proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            try:
                proxy._pyroClaimOwnership()
                proxy._pyroRelease()
            except Exception:
                pass
        self._main_proxy = None
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.terminate()
        stop_process(process)

    def call(self, name: str, *args: Any) -> Any:
        proxy = self._main_proxy if threading.current_thread() is threading.main_thread() else None
        if proxy is None:
            proxy = self._proxy()
        return getattr(proxy, name)(*args)

    def add(self, a: int, b: int) -> int:
        result: int = self._main_proxy.add(a, b)
        return result

    def thread_adder(self) -> Callable[[int, int], int]:
        adder: Callable[[int, int], int] = self._proxy().add
        return adder

    def release_thread(self) -> None:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            return
        self._local.proxy = None
        with self._lock:  # by identity: Pyro5 proxies compare equal by URI
            self._proxies = [p for p in self._proxies if p is not proxy]
        try:
            proxy._pyroRelease()
        except Exception:
            pass
