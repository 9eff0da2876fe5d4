"""The one service every benchmarked system serves, and the child loops of the raw baselines.

This module is imported by every child process (whatever the start method), so it
imports nothing beyond the standard library.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

#: The longest a ``wait()`` call sleeps: long enough for every kill test, short enough
#: that a child forgotten by a bug still ends by itself.
WAIT_SECONDS = 30.0


class Service:
    """``add``, ``echo`` and ``boom`` are the measured methods; the rest serve the fault figures."""

    def add(self, a: int, b: int) -> int:
        return a + b

    def echo(self, x: T) -> T:
        return x

    def boom(self) -> None:
        raise ValueError("boom")

    def wait(self, seconds: float = WAIT_SECONDS) -> None:
        """Block in a call so that a kill can land while a caller waits for the reply."""
        time.sleep(seconds)

    def crash(self) -> NoReturn:
        """Die at once, as a segfault or an OOM kill would: no reply, no cleanup."""
        os._exit(17)

    def getpid(self) -> int:
        return os.getpid()


_SERVICE = Service()


class PoolService:
    """The service of figure 8 (pools): tiny tasks, CPU-bound tasks, a crash."""

    def square(self, x: int) -> int:
        return x * x

    def burn(self, ms: float) -> int:
        return burn(ms)

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> NoReturn:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        ctypes.string_at(0)
        os._exit(70)  # not reached


def square(x: int) -> int:
    return x * x


def burn(ms: float) -> int:
    """Spin the CPU for ``ms`` milliseconds of this process's CPU time."""
    end = time.process_time() + ms / 1000
    count = 0
    while time.process_time() < end:
        count += 1
    return count


def call_service(name: str, *args: Any) -> Any:
    """Module-level entry point (picklable by reference) for ProcessPoolExecutor.submit."""
    return getattr(_SERVICE, name)(*args)


def die_with_parent(runner_pid: int | None = None) -> None:
    """Make sure this child ends when the benchmark runner does, however the runner ends.

    ``PR_SET_PDEATHSIG`` covers a child whose parent is the runner; a thread waiting on
    a pidfd of ``runner_pid`` covers children of the forkserver, whose parent outlives
    the runner (it waits for its children to close their copy of its "alive" pipe).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if runner_pid is not None:
        threading.Thread(
            target=_exit_after, args=(runner_pid,), name="bench-runner-watch", daemon=True
        ).start()


def _exit_after(pid: int) -> None:
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has exited
    else:
        while _alive(pid):
            time.sleep(0.5)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def raw_loop_a(conn: Connection, parent_end: Connection | None, runner_pid: int) -> None:
    """Raw loop A: ``conn.recv()`` / ``conn.send()`` (multiprocessing pickles for us)."""
    die_with_parent(runner_pid)
    if parent_end is not None:
        parent_end.close()
    service = Service()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, args = msg
        try:
            reply: tuple[bool, Any] = (True, getattr(service, name)(*args))
        except Exception as exc:
            reply = (False, exc)
        conn.send(reply)


def raw_loop_b(conn: Connection, parent_end: Connection | None, runner_pid: int) -> None:
    """Raw loop B: ``send_bytes(pickle.dumps(msg, 5))`` / ``pickle.loads(recv_bytes())``."""
    die_with_parent(runner_pid)
    if parent_end is not None:
        parent_end.close()
    service = Service()
    dumps, loads = pickle.dumps, pickle.loads
    while True:
        try:
            msg = loads(conn.recv_bytes())
        except EOFError:
            return
        if msg is None:
            return
        name, args = msg
        try:
            reply: tuple[bool, Any] = (True, getattr(service, name)(*args))
        except Exception as exc:
            reply = (False, exc)
        conn.send_bytes(dumps(reply, protocol=5))
