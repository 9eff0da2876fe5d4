"""Services for the call tests; importable by children under every start method."""

from __future__ import annotations

import gc
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class CustomError(Exception):
    """An exception whose __init__ does not take its own args."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class LockedError(Exception):
    """An exception that holds a lock, so it cannot pickle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class ExitingStrError(Exception):
    """An exception whose ``str()`` raises ``SystemExit``."""

    def __str__(self) -> str:
        raise SystemExit(3)


class OwnBaseException(BaseException):
    """A ``BaseException`` that is neither an ``Exception`` nor an interrupt or exit."""


#: What ``RefusesToPickle`` raises, by name.
PICKLING_FAILURES: dict[str, type[BaseException]] = {
    "GeneratorExit": GeneratorExit,
    "OwnBaseException": OwnBaseException,
    "SystemExit": SystemExit,
}


class RefusesToPickle:
    """A value whose ``__reduce__`` raises a ``BaseException`` (``PICKLING_FAILURES[kind]``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        raise PICKLING_FAILURES[self.kind](f"{self.kind} from __reduce__")


class RefusesToPickleError(Exception):
    """An exception whose pickling raises a ``BaseException``."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise PICKLING_FAILURES[str(self.args[0])]("from __reduce__")


class CalcService:
    counter = 0

    def __init__(self) -> None:
        self._called_secret = False

    def add(self, a: int, b: int) -> int:
        return a + b

    def echo(self, value: Any) -> Any:
        return value

    def apply(self, fn: Callable[[int], int], value: int) -> int:
        return fn(value)

    def fail(self, *args: object) -> None:
        raise ValueError(*args)

    def raise_custom(self, code: int, detail: str) -> None:
        raise CustomError(code, detail)

    def raise_with_lock(self) -> None:
        raise LockedError("holds a lock")

    def raise_chained(self) -> None:
        try:
            missing: dict[str, int] = {}
            missing["key"]
        except KeyError as exc:
            raise RuntimeError("outer") from exc

    def raise_builtin(self, name: str) -> None:
        kinds: dict[str, type[BaseException]] = {
            "SystemExit": SystemExit,
            "KeyboardInterrupt": KeyboardInterrupt,
        }
        raise kinds[name]()

    def refuses_to_pickle(self, kind: str) -> RefusesToPickle:
        return RefusesToPickle(kind)

    def raise_refusing_to_pickle(self, kind: str) -> None:
        raise RefusesToPickleError(kind)

    def make_lock(self) -> threading.Lock:
        return threading.Lock()

    def make_bytes(self, size: int) -> bytes:
        return bytes(size)

    def raise_exiting_str(self) -> None:
        raise ExitingStrError("x")

    def make_buffer(self, size: int, fill: int) -> Any:
        """``size`` bytes of ``fill`` sent out of band; the caller gets a writable memoryview."""
        return pickle.PickleBuffer(bytearray([fill]) * size)

    def sleep_then_return(self, seconds: float, value: Any) -> Any:
        time.sleep(seconds)
        return value

    def wait_for_path(self, path: str, timeout: float) -> bool:
        """Create ``path.started``; True once ``path`` exists, False after ``timeout`` s."""
        with open(f"{path}.started", "w"):
            pass
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def rendezvous(self) -> bool:
        """Return once four calls are in here at the same time (BrokenBarrierError if not)."""
        # Made on first use (the service must stay picklable); setdefault is atomic.
        barrier = self.__dict__.setdefault("_barrier", threading.Barrier(4, timeout=10))
        barrier.wait()
        return True

    def meet(self, parties: int) -> bool:
        """Return once ``parties`` calls are in here at once (else BrokenBarrierError)."""
        barriers = self.__dict__.setdefault("_meetings", {})
        barrier = barriers.setdefault(parties, threading.Barrier(parties, timeout=10))
        barrier.wait()
        return True

    def side_channels(self) -> int:
        """How many side channels this child's server loop serves now."""
        from pipe_rpc._server import _Loop

        (loop,) = [obj for obj in gc.get_objects() if isinstance(obj, _Loop)]
        return len(loop.side)

    def socket_inodes(self) -> set[int]:
        """The inode numbers of the sockets this process has open."""
        inodes = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    inodes.add(os.fstat(int(name)).st_ino)
            except OSError:
                pass
        return inodes

    def eventfds(self) -> int:
        """How many eventfds this process has open."""
        return len(self.eventfd_numbers())

    def eventfd_numbers(self) -> set[int]:
        """The descriptors of the eventfds this process has open."""
        found = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                    found.add(int(name))
            except OSError:
                pass
        return found

    def use_every_descriptor(self) -> int:
        """Open descriptors until the limit is reached and keep them; how many were opened."""
        held = self.__dict__.setdefault("_held", [])
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                return len(held)

    def fork_sleeper(self, seconds: float) -> int:
        """Fork a grandchild that keeps every descriptor of this process for ``seconds``."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the grandchild)
            time.sleep(seconds)
            os._exit(0)
        return pid

    def imported(self, module: str) -> bool:
        return module in sys.modules

    def pid(self) -> int:
        return os.getpid()

    @property
    def prop(self) -> int:
        raise AssertionError("a property must never run")

    def _secret(self) -> None:
        self._called_secret = True

    def secret_was_called(self) -> bool:
        return self._called_secret
