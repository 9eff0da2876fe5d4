"""The server loop: ``serve()``, the exposure rules, and concurrency.

One thread reads requests. With ``max_concurrency=1`` it runs each call itself,
in arrival order, and writes the replies of everything it read in one go
(fewer system calls when a client pipelines). With ``N > 1`` calls run on a
pool of N threads and each writes its own reply under the write lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ._codec import Buffer
from ._errors import MethodNotFoundError
from ._messages import Call, Fail, FailKind, Shutdown
from ._protocol import ServerProtocol
from ._transport import PeerGone, Transport, enlarge_buffers

#: A serial call that ran longer than this flushes replies held for batching.
_FLUSH_AFTER = 0.001


class Dispatcher:
    """Finds and runs the public methods of one service object."""

    def __init__(self, service: object) -> None:
        self.service = service
        self._methods: dict[str, Callable[..., Any]] = {}

    def lookup(self, name: str) -> Callable[..., Any]:
        """The bound method ``name``, or ``MethodNotFoundError`` having run nothing.

        A name is refused when it starts with ``_``, contains a dot, or is not a
        callable attribute; properties are refused without running their getter.
        """
        method: Callable[..., Any] | None = self._methods.get(name)
        if method is not None:
            return method
        if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
            raise MethodNotFoundError(
                f"{name!r} is not a public method name (no leading underscore, no dots)"
            )
        kind = type(self.service).__name__
        static = _static_attribute(self.service, name)
        if isinstance(static, property | staticmethod | classmethod) and not callable(
            getattr(static, "__func__", None)
        ):
            raise MethodNotFoundError(f"{kind}.{name} is a property, not a method")
        try:
            method = getattr(self.service, name)
        except AttributeError:
            raise MethodNotFoundError(f"{kind} has no method {name!r}") from None
        if not callable(method):
            raise MethodNotFoundError(f"{kind}.{name} is not callable")
        self._methods[name] = method
        return method

    def run(self, call: Call) -> tuple[bool, Any]:
        """Run one call: ``(True, result)``, ``(False, exception)`` or ``(False, Fail)``."""
        method = self._methods.get(call.method)
        if method is None:
            try:
                method = self.lookup(call.method)
            except MethodNotFoundError as exc:
                return False, Fail(call.call_id, FailKind.METHOD_NOT_FOUND, str(exc))
        try:
            return True, method(*call.args, **call.kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt go back to the caller too
            tb = exc.__traceback__
            if tb is not None and tb.tb_next is not None:
                exc.__traceback__ = tb.tb_next  # drop this frame from the remote traceback
            return False, exc


def _static_attribute(obj: object, name: str) -> object:
    """``obj.name`` as stored, without running a descriptor (``None`` if not found).

    The instance's ``__dict__`` first, then the classes of its MRO, as attribute
    look-up goes for anything that is not a data descriptor. A cheap stand-in for
    ``inspect.getattr_static``: importing ``inspect`` would cost a child's first
    call more than 10 ms.
    """
    try:
        instance_dict = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        instance_dict = {}
    for klass in type(obj).__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            if isinstance(found, property) or name not in instance_dict:
                return found
            break
    return instance_dict.get(name)


def serve(service: object, conn: Connection, *, max_concurrency: int = 1) -> None:
    """Serve ``service`` on ``conn`` until the peer closes or asks to stop.

    Args:
        service: the object whose public methods may be called.
        conn: this side of a duplex ``multiprocessing.Pipe``.
        max_concurrency: how many calls may run at once (threads); 1 runs them in order.

    Raises:
        ValueError: ``max_concurrency`` is not a positive integer.
        ProtocolError: the peer broke the wire protocol.
    """
    check_max_concurrency(max_concurrency)
    _Loop(service, conn, max_concurrency).run()


def check_max_concurrency(max_concurrency: int) -> None:
    """Raise ``ValueError`` unless ``max_concurrency`` is an int >= 1."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")


class _Loop:
    def __init__(self, service: object, conn: Connection, max_concurrency: int) -> None:
        self.protocol = ServerProtocol()
        self.dispatcher = Dispatcher(service)
        self.transport = Transport(conn)
        enlarge_buffers(conn)
        self.write_lock = threading.Lock()
        self.pool = None
        if max_concurrency > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="pipe_rpc-call")

    def run(self) -> None:
        try:
            self.send(self.protocol.greeting())
            while self.step():
                pass
        except PeerGone:
            pass
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def step(self) -> bool:
        """Read once and answer what came; False once the peer is done."""
        bodies = self.transport.read_blocking()
        if len(bodies) == 1 and self.pool is None:  # the common case: one call, answer it now
            message = self.protocol.receive(bodies[0])
            if type(message) is Call:
                ok, value = self.dispatcher.run(message)
                # One thread writes when there is no pool: no lock needed.
                self.transport.write(self.protocol.reply(message.call_id, ok, value))
                return True
            if isinstance(message, Shutdown):
                return False
            if isinstance(message, Fail):
                self.send(self.protocol.reply(message.call_id, False, message))
            return True
        out: list[Buffer] = []
        try:
            for body in bodies:
                message = self.protocol.receive(body)
                if message is None:
                    continue
                if isinstance(message, Shutdown):
                    return False
                if isinstance(message, Fail):
                    out += self.protocol.reply(message.call_id, False, message)
                elif self.pool is not None:
                    self.pool.submit(self.run_and_reply, message)
                else:
                    started = time.perf_counter()
                    ok, value = self.dispatcher.run(message)
                    out += self.protocol.reply(message.call_id, ok, value)
                    del value
                    if time.perf_counter() - started > _FLUSH_AFTER:
                        self.send(out)
                        out = []
        finally:
            if out:
                self.send(out)
        return True

    def run_and_reply(self, call: Call) -> None:
        ok, value = self.dispatcher.run(call)
        frame = self.protocol.reply(call.call_id, ok, value)
        del value
        try:
            self.send(frame)
        except PeerGone:
            pass

    def send(self, segments: list[Buffer]) -> None:
        with self.write_lock:
            self.transport.write(segments)
