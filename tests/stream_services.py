"""Services with generator methods, for the streaming tests (importable by children)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Generator, Iterator

from tests.calc_service import CustomError


class Streamer:
    def __init__(self) -> None:
        self.produced = 0
        self.closed = 0

    def rows(self, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                self.produced += 1
                yield i
        finally:
            self.closed += 1

    def forever(self, size: int = 0) -> Generator[bytes | int, None, None]:
        i = 0
        try:
            while True:
                self.produced += 1
                yield os.urandom(size) if size else i
                i += 1
        finally:
            self.closed += 1

    def same(self, size: int) -> Generator[bytes, None, None]:
        """One ``bytes`` of ``size``, again and again, as fast as it is taken."""
        blob = os.urandom(size)
        while True:
            yield blob

    def fails_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise CustomError(n, "stream")

    def slow(self, seconds: float) -> Generator[int, None, None]:
        yield 0
        time.sleep(seconds)
        yield 1

    def dies_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        os._exit(3)

    def unpicklable(self) -> Iterator[object]:
        yield 1
        yield lambda: None  # a lambda of this module pickles by reference: use a lock
        yield __import__("threading").Lock()

    async def arows(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def counts(self) -> tuple[int, int]:
        return self.produced, self.closed

    def add(self, a: int, b: int) -> int:
        return a + b
