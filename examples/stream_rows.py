"""Streaming: a generator method of the service is an iterator in the parent.

Run it from the repository root::

    python examples/stream_rows.py
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator

import pipe_rpc


class Table:
    """The service: rows of a CSV file, an endless counter, and an async generator."""

    def __init__(self) -> None:
        self.closed = 0

    def rows(self, count: int) -> Iterator[dict[str, str]]:
        """Write a CSV of ``count`` rows, then yield them as ``csv`` reads them back."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "squares.csv")
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["n", "square"])
                writer.writerows((n, n * n) for n in range(count))
            with open(path, newline="") as f:
                yield from csv.DictReader(f)

    def counter(self) -> Generator[int, None, None]:
        try:
            yield from itertools.count()
        finally:
            self.closed += 1  # runs in the child when the parent stops early

    def closed_generators(self) -> int:
        return self.closed

    async def ticks(self, count: int) -> AsyncIterator[int]:
        for n in range(count):
            await asyncio.sleep(0)
            yield n


def main() -> None:
    with pipe_rpc.spawn(Table) as table:
        # 1. The call returns an iterator at once; rows arrive as the child reads them,
        #    many to a frame, and the child stays at most a window ahead of this loop.
        total = count = 0
        for row in table.rows(10_000):
            total += int(row["square"])
            count += 1
        print(f"read {count} rows, sum of squares {total}")

        # 2. Stopping early: close() (or leaving a `with` block, or dropping the
        #    iterator) stops the child's generator, whose `finally` runs there.
        counter = table.counter()
        first = []
        for n in counter:
            if n == 5:
                break
            first.append(n)
        counter.close()
        print(f"first items of an endless stream: {first}")
        print(f"the child's generator was closed: {table.closed_generators() == 1}")

    # 3. From async code: astream() iterates any streaming method, and an
    #    `async def` generator method returns an async iterator itself.
    async def from_async_code() -> None:
        async with await pipe_rpc.aspawn(Table) as table:
            squares = [row["square"] async for row in pipe_rpc.astream(table.rows, 4)]
            print(f"astream: {squares}")
            print(f"async generator method: {[n async for n in table.ticks(3)]}")

    asyncio.run(from_async_code())


if __name__ == "__main__":
    main()
