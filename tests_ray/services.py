"""Services for the Ray tests. Ray workers import this module by name (``tests_ray.services``)
to unpickle the factories, so everything here is at module level and nothing imports pytest."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path


class ServiceError(Exception):
    """What ``Service.fail`` raises: a user exception type, rebuilt by reference."""


class TwoPartError(Exception):
    """An exception whose ``__init__`` does not take its own ``args``: rebuilt from its parts."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class Service:
    def __init__(self) -> None:
        self.count = 0
        self._barrier: threading.Barrier | None = None
        self._barrier_lock = threading.Lock()

    def add(self, a: int, b: int) -> int:
        return a + b

    def pid(self) -> int:
        return os.getpid()

    def bump(self) -> int:
        self.count += 1
        return self.count

    def fail(self, message: str) -> None:
        raise ServiceError(message)

    def fail_in_parts(self) -> None:
        raise TwoPartError(7, "seven")

    def exit(self) -> None:
        sys.exit(3)

    def die(self) -> None:
        os._exit(3)

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def lock(self) -> threading.Lock:
        return threading.Lock()  # a result that does not pickle

    def square(self, x: int) -> int:
        return x * x

    def slow_square(self, x: int) -> int:
        time.sleep(0.2 if x % 2 == 0 else 0.0)  # even items finish last
        return x * x

    def fail_on(self, x: int) -> int:
        if x == 3:
            raise ServiceError(f"no {x}")
        return x

    def count_to(self, n: int, mark: str) -> Iterator[int]:
        """Yields 0..n-1; writes ``mark`` when the generator is closed or finishes."""
        try:
            for i in range(n):
                yield i
                time.sleep(0.05)
        finally:
            Path(mark).write_text("closed")

    async def acount_to(self, n: int, mark: str) -> AsyncIterator[int]:
        """``count_to`` as an async generator."""
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0.05)
        finally:
            Path(mark).write_text("closed")

    def meet(self, parties: int, timeout: float) -> bool:
        """Returns once ``parties`` calls are in here at the same time."""
        with self._barrier_lock:
            if self._barrier is None:
                self._barrier = threading.Barrier(parties)
        self._barrier.wait(timeout)
        return True

    def _private(self) -> str:
        return "private"


class BrokenFactory:
    def __init__(self) -> None:
        raise ServiceError("the factory refuses")
