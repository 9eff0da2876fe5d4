"""asyncio: await typed calls without a thread per call, cancel them safely.

Run: python examples/async_client.py
"""

from __future__ import annotations

import asyncio

import pipe_rpc


class Fetcher:
    """A service whose methods are plain and ``async def``."""

    def add(self, a: int, b: int) -> int:
        return a + b

    async def fetch(self, key: str) -> str:
        await asyncio.sleep(0.01)  # runs as a task on the child's own event loop
        return key.upper()

    def slow(self, seconds: float) -> str:
        import time

        time.sleep(seconds)
        return "slow"


async def main() -> None:
    async with await pipe_rpc.aspawn(Fetcher, max_concurrency=8) as fetcher:
        print("acall:", await pipe_rpc.acall(fetcher.add, 1, 2))
        totals = await asyncio.gather(*(pipe_rpc.acall(fetcher.add, i, i) for i in range(100)))
        print("100 calls in flight at once, sum:", sum(totals))
        print("async def method:", await fetcher.fetch("key"))
        task = asyncio.ensure_future(pipe_rpc.acall(fetcher.slow, 5.0))
        await asyncio.sleep(0.1)
        task.cancel()  # acts as the call's timeout: the call is abandoned
        try:
            await task
        except asyncio.CancelledError:
            print("cancelled; the proxy goes on:", await pipe_rpc.acall(fetcher.add, 2, 2))
        future = pipe_rpc.submit(fetcher.add, 20, 22)
        print("submit:", future.result(timeout=10))


if __name__ == "__main__":
    asyncio.run(main())
