"""Services for the isolation and untrusted-child tests; importable by children as
``tests.isolation_services`` under every start method.

Nothing here imports ``tests.untrusted_only_module`` at module level: the
untrusted tests check that the parent never imports it.
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import attrs

from pipe_rpc._messages import HELLO_MAGIC, PROTOCOL_VERSION, Call, Tag

#: A frame body starts with its tag (1 byte) and call id (8 bytes).
BODY_HEAD = struct.Struct("!BQ")
#: ``Connection.send_bytes`` frames a body with its 4-byte big-endian length.
LENGTH = struct.Struct("!i")


def _no_core_dumps() -> None:
    """A child killed by SIGXCPU or SIGSEGV must not leave a core file behind."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def resident_bytes(pid: int) -> int:
    """The resident memory of process ``pid``, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS line for process {pid}")


class Victim:
    """A service that misbehaves on request: runaway loops, hangs, memory and fd bombs."""

    def __init__(self) -> None:
        _no_core_dumps()
        self.hoard: list[bytes] = []
        self.grandchildren: list[subprocess.Popen[bytes]] = []

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "pong"

    def spin(self) -> None:
        while True:
            pass

    def spin_ignoring_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            pass

    def announce_and_spin(self) -> None:
        """Tell the parent (on the shared stdout) that the call is running, then spin."""
        os.write(sys.stdout.fileno(), f"BUSY {os.getpid()}\n".encode())  # one atomic write
        while True:
            pass

    def start_grandchild(self) -> int:
        """Start ``sleep 600`` in this child's process group and return its pid."""
        proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        self.grandchildren.append(proc)
        return proc.pid

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)

    def block(self, flag_path: str, seconds: float) -> None:
        """Create ``flag_path`` (so the parent knows the call is running), then sleep."""
        with open(flag_path, "w"):
            pass
        time.sleep(seconds)

    def allocate(self, nbytes: int) -> int:
        return len(bytearray(nbytes))

    def fail_holding(self, nbytes: int) -> None:
        """Raise while a local holds ``nbytes`` of memory that has been written to."""
        buffer = bytearray(nbytes)
        buffer[:: 1 << 12] = b"x" * len(range(0, nbytes, 1 << 12))  # touch every page
        raise ValueError(f"failed holding {len(buffer)} bytes")

    def resident_bytes(self) -> int:
        """This process's resident memory (``VmRSS``)."""
        return resident_bytes(os.getpid())

    def exhaust_memory(self) -> int:
        """Fill the address space down to the last few bytes and keep it full."""
        size = 1 << 26
        while size >= 16:
            try:
                self.hoard.append(bytes(size))
            except MemoryError:
                size //= 4
        return len(self.hoard)

    def release(self) -> int:
        held = len(self.hoard)
        self.hoard.clear()
        return held

    def open_files(self, directory: str, count: int) -> int:
        """Open ``count`` files at once (closing them all before returning or raising)."""
        opened: list[Any] = []
        try:
            for i in range(count):
                opened.append(open(os.path.join(directory, f"f{i}"), "w"))  # noqa: SIM115
            return len(opened)
        finally:
            for f in opened:
                f.close()


# -- untrusted children ------------------------------------------------------


@attrs.frozen
class Point:
    """A plain value type a caller may allow from an untrusted child."""

    x: int
    y: int


class CustomError(Exception):
    """An exception type that is not a builtin: an untrusted child's one is a RemoteError."""


class SystemGadget:
    """Pickles as ``os.system(command)``: running it in the parent would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class ImportGadget:
    """Pickles as ``builtins.__import__(module)``: it would import a module in the parent."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.__import__, (self.module,))


class GetattrGadget:
    """Pickles as ``getattr(builtins_module, "eval")``, the first step of most pickle exploits."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (builtins, "eval"))


class SystemError_(Exception):
    """An exception whose pickle runs ``os.system`` when loaded."""

    def __init__(self, command: str) -> None:
        super().__init__(command)
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _current_call_id() -> int:
    """The id of the call this code runs in (found on the server's stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        call = frame.f_locals.get("call")
        if isinstance(call, Call):
            return call.call_id
        frame = frame.f_back  # type: ignore[assignment]
    raise LookupError("not running inside a pipe_rpc call")


def _server_loop() -> Any:
    """The ``serve()`` loop of this process (there is exactly one in a pipe_rpc child)."""
    from pipe_rpc._server import _Loop

    loops = [obj for obj in gc.get_objects() if isinstance(obj, _Loop)]
    if len(loops) != 1:
        raise LookupError(f"expected one server loop in this process, found {len(loops)}")
    return loops[0]


def frame_bytes(tag: int, call_id: int, payload: bytes) -> bytes:
    """A whole frame as it travels on the pipe: length, tag, call id, payload."""
    body = BODY_HEAD.pack(tag, call_id) + payload
    return LENGTH.pack(len(body)) + body


def plain_data() -> dict[str, Any]:
    """Nested plain data of every kind an untrusted child may send."""
    return {
        "lists": [[1, 2.5, None, True], [("a", b"b"), ("c", bytearray(b"d"))]],
        "sets": [{1, 2, 3}, frozenset({"x", (1, 2)})],
        "complex": complex(1, -2),
        "nested": {"t": ((1,), (2, (3, {4, 5}))), "fs": frozenset({frozenset({1})})},
        "big": 2**100,
        "floats": [float("inf"), -0.0, 1e-300],
        "text": "h\u00e9llo \U0001f600",
        "empty": [b"", bytearray(), (), {}, set(), frozenset(), ""],
    }


class Hostile:
    """A service that an attacker controls: it sends crafted replies to its parent."""

    def __init__(self) -> None:
        _no_core_dumps()

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "pong"

    def plain(self) -> dict[str, Any]:
        return plain_data()

    def point(self, x: int, y: int) -> Point:
        return Point(x, y)

    def raise_value_error(self, *args: object) -> None:
        raise ValueError(*args)

    def raise_key_error(self, key: object) -> None:
        raise KeyError(key)

    def raise_os_error(self, code: int, text: str, filename: str) -> None:
        raise OSError(code, text, filename)

    def raise_custom(self, text: str) -> None:
        raise CustomError(text)

    def raise_system_gadget(self, command: str) -> None:
        raise SystemError_(command)

    # The replies below are pickled as a trusted child pickles its results, sent by hand:
    # a child that knows its parent is untrusting refuses to send them itself.

    def point_by_pickle(self, x: int, y: int) -> None:
        self._reply_pickled(Point(x, y))

    def system_gadget(self, command: str) -> None:
        self._reply_pickled(SystemGadget(command))

    def import_gadget(self, module: str) -> None:
        self._reply_pickled(ImportGadget(module))

    def getattr_gadget(self) -> None:
        self._reply_pickled(GetattrGadget())

    def unknown_module_object(self) -> None:
        """An instance of a class from a module only this child has imported."""
        from tests.untrusted_only_module import Thing

        self._reply_pickled(Thing(1))

    def _reply_pickled(self, value: object) -> None:
        """Answer this call with ``value`` pickled as a trusted child pickles a result."""
        from pipe_rpc._pickling import dumps

        self.send_reply(int(Tag.RETURN), dumps(value, what="result"))

    def make_bytes(self, size: int) -> bytes:
        return bytes(size)

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the parent on the pipe as is (it need not even be a frame)."""
        _server_loop().main.send([data])

    def send_reply(self, tag: int, payload: bytes) -> Any:
        """Answer this very call with a frame of ``tag`` carrying a hand-written ``payload``."""
        _server_loop().main.send([frame_bytes(tag, _current_call_id(), payload)])
        # The real reply that follows is never read: the crafted one breaks the connection,
        # or (an exception frame) is taken as this call's answer.
        return None


def fake_server(conn: Connection, replies: list[bytes | tuple[int, bytes]]) -> None:
    """A hand-written peer: takes the client's hello, then sends ``replies`` in order.

    An item ``bytes`` is written as is before anything else happens (e.g. garbage
    instead of the hello); a ``(tag, payload)`` item answers the next call.
    """
    _no_core_dumps()
    fd = conn.fileno()
    conn.recv_bytes()  # the client's hello
    hello = HELLO_MAGIC + struct.pack("!HI", PROTOCOL_VERSION, os.getpid())
    said_hello = False
    for item in replies:
        if isinstance(item, bytes):
            os.write(fd, item)
            continue
        if not said_hello:
            os.write(fd, frame_bytes(Tag.HELLO, 0, hello))
            said_hello = True
        body = conn.recv_bytes()
        (_, call_id) = BODY_HEAD.unpack_from(body)
        tag, payload = item
        os.write(fd, frame_bytes(tag, call_id, payload))
    with contextlib.suppress(EOFError, OSError):
        while True:
            conn.recv_bytes()


# -- replies that are small but costly to hash -----------------------------------------

#: Every int ``k * HASH_MODULUS`` hashes to 0.
HASH_MODULUS = 2**61 - 1


def shared_tuple_set(depth: int) -> bytes:
    """A pickle of ``{t}``, where ``t = (u, u)``, ``u = (v, v)`` ... ``depth`` levels down to
    ``()``: each level is the one below twice (through the memo), so hashing ``t`` visits
    ``2**depth`` leaves, from a pickle of about ``4 * depth`` bytes."""
    body = b"\x80\x04\x8f(" + b")"  # EMPTY_SET, MARK, EMPTY_TUPLE
    for level in range(depth):
        # MEMOIZE the top as ``level``, BINGET it back, TUPLE2: (top, top)
        body += b"\x94h" + bytes([level]) + b"\x86"
    return body + b"\x90."  # ADDITEMS, STOP


def colliding_int_keys(count: int) -> bytes:
    """A pickle of a dict with ``count`` int keys that all hash to 0.

    Written by hand: building the dict to pickle it would take the quadratic time itself.
    """
    body = [b"\x80\x04}"]  # EMPTY_DICT
    for start in range(1, count + 1, 1000):
        body.append(b"(")  # MARK
        for k in range(start, min(start + 1000, count + 1)):
            key = (k * HASH_MODULUS).to_bytes(12, "little", signed=True)
            body.append(b"\x8a\x0c" + key + b"N")  # LONG1 key, NONE value
        body.append(b"u")  # SETITEMS
    return b"".join(body) + b"."
