"""Services and fault objects for tests/test_faults.py.

Children started by ``forkserver`` and ``spawn`` import this module by name
(``tests.services``) to unpickle what crosses the pipe, so everything here is
defined at module level and nothing here imports pytest.

The fault objects follow CPython's ``Lib/test/test_concurrent_futures/test_deadlock.py``:
an object whose ``__reduce__`` faults while it is *pickled*, and one whose
``__reduce__`` names a function that faults while it is *unpickled*. Which
process pickles or unpickles it decides where the fault happens.
"""

from __future__ import annotations

import array
import ctypes
import faulthandler
import fcntl
import os
import resource
import sys
import termios
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal, NoReturn

import pipe_rpc

Fault = Literal["raise", "sys_exit", "os_exit", "segfault"]
FAULTS: tuple[Fault, ...] = ("raise", "sys_exit", "os_exit", "segfault")

#: The message of the ``FaultError`` the "raise" fault raises.
FAULT_MESSAGE = "injected fault"
#: ``sys.exit(SYS_EXIT_CODE)``: a code of its own, so an exit code tells which fault ran.
SYS_EXIT_CODE = 5
#: ``os._exit(OS_EXIT_CODE)``: 0, the exit that looks most like a clean shutdown.
OS_EXIT_CODE = 0

StartMethod = Literal["fork", "forkserver", "spawn"]
CallerStage = Literal["argument_pickling", "result_unpickling"]


class FaultError(Exception):
    """What the "raise" fault raises; it pickles by reference, like any user exception."""


def trigger(fault: Fault) -> NoReturn:
    """Fault in the current process: raise, ``sys.exit``, ``os._exit`` or segfault."""
    if fault == "raise":
        raise FaultError(FAULT_MESSAGE)
    if fault == "sys_exit":
        sys.exit(SYS_EXIT_CODE)
    if fault == "os_exit":
        os._exit(OS_EXIT_CODE)
    if fault == "segfault":
        segfault()
    raise ValueError(f"unknown fault {fault!r}")


def segfault() -> NoReturn:
    """Die by SIGSEGV, as a broken C extension would, without a core file or a traceback dump."""
    faulthandler.disable()  # pytest enables it in the parent; a forked child inherits it
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    ctypes.string_at(0)
    raise AssertionError("ctypes.string_at(0) did not crash")


class FaultAtPickle:
    """Faults in whichever process pickles it."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault

    def __reduce__(self) -> NoReturn:
        trigger(self.fault)


class FaultAtUnpickle:
    """Pickles fine; faults in whichever process unpickles it."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault

    def __reduce__(self) -> tuple[Callable[[Fault], NoReturn], tuple[Fault]]:
        return trigger, (self.fault,)


class FaultService:
    """A service with a harmless method and a way in for every kind of fault."""

    def __init__(self) -> None:
        self.echoed = 0

    def add(self, a: int, b: int) -> int:
        return a + b

    def pid(self) -> int:
        return os.getpid()

    def echo(self, value: object) -> object:
        self.echoed += 1
        return value

    def echo_count(self) -> int:
        """How many times ``echo`` ran (a call whose arguments did not unpickle must not run)."""
        return self.echoed

    def fault(self, fault: Fault) -> None:
        trigger(fault)

    def result_faulting_at_pickle(self, fault: Fault) -> FaultAtPickle:
        return FaultAtPickle(fault)

    def result_faulting_at_unpickle(self, fault: Fault, padding: bytes = b"") -> FaultAtUnpickle:
        del padding  # only there to make the request frame large
        return FaultAtUnpickle(fault)

    def exit_now(self, code: int) -> None:
        os._exit(code)

    def block(self, marker: str) -> None:
        """Create ``marker`` (so the parent knows the call runs), then block for ever."""
        Path(marker).touch()
        threading.Event().wait()

    def record_and_exit(self, counter: str, code: int) -> None:
        """Append a line to ``counter``, then exit without a reply."""
        with open(counter, "a") as file:
            file.write(f"{os.getpid()}\n")
        os._exit(code)


class QueueWatchingService(FaultService):
    """A ``FaultService`` that can see how many request bytes wait in its own pipe.

    It is served by a hand-written ``serve()`` setup, which is how it learns the
    descriptor of its end of the pipe.
    """

    def __init__(self, conn_fd: int) -> None:
        super().__init__()
        self.conn_fd = conn_fd

    def queued_bytes(self) -> int:
        """How many request bytes wait unread in this end of the pipe (``FIONREAD``)."""
        queued = array.array("i", [0])
        fcntl.ioctl(self.conn_fd, termios.FIONREAD, queued, True)
        return queued[0]

    def hold_until_queued(self, marker: str, min_bytes: int, timeout: float = 10.0) -> int:
        """Create ``marker``, then return once ``min_bytes`` request bytes wait unread.

        With ``max_concurrency=1`` this holds the serial server loop, so the
        requests sent meanwhile are all read, run and answered in one batch.
        It returns once the count has reached ``min_bytes`` and stopped growing,
        so no request is caught half written.
        """
        Path(marker).touch()
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            queued = self.queued_bytes()
            if queued >= min_bytes and queued == last:
                return queued
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {queued} of {min_bytes} bytes came")
            last = queued
            time.sleep(0.002)  # poll interval of a loop bounded by its deadline


def serve_watching_queue(conn: Connection) -> None:
    """A ``multiprocessing.Process`` target: serve a ``QueueWatchingService`` on ``conn``."""
    pipe_rpc.serve(QueueWatchingService(conn.fileno()), conn)


def caller_fault_main(stage: CallerStage, fault: Fault, start_method: StartMethod) -> NoReturn:
    """Run in a subprocess: make the *caller's own* process fault at ``stage``.

    Prints ``child <pid>`` first, and ``survived`` if the call came back at all;
    then exits with 99. A fatal fault in the caller ends this process first.
    """
    server = pipe_rpc.spawn(FaultService, start_method=start_method)
    print(f"child {server.pid}", flush=True)
    try:
        if stage == "argument_pickling":
            server.proxy.echo(FaultAtPickle(fault))
        elif stage == "result_unpickling":
            server.proxy.result_faulting_at_unpickle(fault)
        else:
            raise ValueError(f"stage {stage!r} does not run in the caller")
    except BaseException as exc:
        print(f"survived: {exc!r}", flush=True)
    else:
        print("survived: no error", flush=True)
    server.close()
    os._exit(99)
