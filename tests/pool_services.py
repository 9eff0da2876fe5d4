"""Services and factories for tests/test_pool.py.

Children started by ``forkserver`` and ``spawn`` import this module by name to
unpickle their factory, so everything is at module level and nothing here
imports pytest.
"""

from __future__ import annotations

import fcntl
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.services import segfault


class Worker:
    """A service with calls that answer at once, crash, raise, hold, or grow."""

    def __init__(self) -> None:
        self.ballast: list[bytes] = []

    def pid(self) -> int:
        return os.getpid()

    def square(self, x: int) -> int:
        return x * x

    def parse(self, x: int) -> int:
        """Twice ``x``; a negative ``x`` crashes the process (SIGSEGV)."""
        if x < 0:
            segfault()
        return 2 * x

    def check(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x

    def hold(self, gate: str, marker: str) -> int:
        """Write our pid to ``marker``, then wait until someone opens ``gate`` (a FIFO)
        for writing and closes it. Returns our pid."""
        Path(marker).write_text(str(os.getpid()))
        with open(gate, "rb") as fifo:
            fifo.read()
        return os.getpid()

    def hold_first(self, item: tuple[int, str]) -> int:
        """``x`` of ``(x, gate)``, but 0 waits at ``gate`` first (see ``hold``)."""
        x, gate = item
        if x == 0:
            with open(gate, "rb") as fifo:
                fifo.read()
        return x

    def grow(self, mib: int) -> int:
        """Keep ``mib`` more MiB resident; returns our pid."""
        self.ballast.append(b"x" * (mib << 20))
        return os.getpid()

    def rss(self) -> int:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def address_space_limit(self) -> int:
        return resource.getrlimit(resource.RLIMIT_AS)[0]

    def allocate(self, size: int) -> int:
        return len(bytearray(size))

    def lock_or_square(self, x: int) -> object:
        """``x * x``; a lock (which will not pickle) for a negative ``x``."""
        return threading.Lock() if x < 0 else x * x

    def opaque(self) -> Opaque:
        return Opaque()

    def count(self, n: int) -> Iterator[int]:
        """A generator method: a stream through the proxy."""
        yield from range(n)

    async def twice(self, x: int) -> int:
        return 2 * x

    @property
    def name(self) -> str:
        return f"worker {os.getpid()}"


class Opaque:
    """A type an untrusted pool does not allow in a reply."""


def _count_start(counter: str) -> int:
    """Add one to the number in ``counter`` (under a lock: children start at once)."""
    with open(counter, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        number = int(file.read() or "0")
        file.seek(0)
        file.truncate()
        file.write(str(number + 1))
        return number


class Flaky(Worker):
    """Starts ``first`` times, then fails every other start: the 1st after them, the 3rd..."""

    def __init__(self, counter: str, first: int) -> None:
        super().__init__()
        number = _count_start(counter)
        if number >= first and (number - first) % 2 == 0:
            raise RuntimeError(f"start {number} fails on purpose")


class Failing(Worker):
    """Writes its pid to ``folder``, then fails."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        Path(folder, str(os.getpid())).touch()
        raise RuntimeError("this factory always fails")


class Stuck(Worker):
    """Writes its pid to ``folder``, then never finishes starting."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        Path(folder, str(os.getpid())).touch()
        while True:
            time.sleep(1)


class Rendezvous(Worker):
    """Starts only once ``count`` children of the same pool have begun to start.

    A pool that waited for each child's hello before starting the next would
    never get past the first: it fails after ``seconds`` instead.
    """

    def __init__(self, folder: str, count: int, seconds: float) -> None:
        super().__init__()
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + seconds
        while len(os.listdir(folder)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(os.listdir(folder))} of {count} children started")
            time.sleep(0.005)
