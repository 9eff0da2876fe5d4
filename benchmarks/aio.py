"""The ``async`` figure: calls from asyncio and futures (contract section 7).

Its own children, started in the figure: one pipe_rpc child with ``max_concurrency=1``
for the latencies (sync call, ``acall``, ``submit``, ``asyncio.to_thread``), one with
``max_concurrency=8`` for the throughput of 64 concurrent ``acall``s against 4
threads making sync calls on one proxy, and a ``ProcessPoolExecutor(1)`` for
``loop.run_in_executor``. Rounds interleave the measurements; values are medians over
rounds. Ratios are "times the cost" as in figure 1 (a time divided by the reference
time, or the reference rate divided by a rate): 1.00 is as fast, 2.00 twice as slow.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor

from benchmarks.common import Section, Settings, Slot, fmt, percentile, say
from benchmarks.service import Service, square
from benchmarks.systems import context, start_method

#: Calls kept in flight by the throughput row, and the server's concurrency there.
IN_FLIGHT = 64
CONCURRENCY = 8
THREADS = 4


def _p50_sync(call: Callable[[], object], n: int) -> float:
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        call()
        out[i] = clock() - t0
    return percentile(out, 0.5) / 1000


async def _p50_async(call: Callable[[], Awaitable[object]], n: int) -> float:
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        await call()
        out[i] = clock() - t0
    return percentile(out, 0.5) / 1000


async def _concurrent_rate(call: Callable[[], Awaitable[object]], total: int) -> float:
    """Calls/s with ``IN_FLIGHT`` calls kept in flight from one loop."""
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return total / (time.perf_counter() - started)


def _threads_rate(call: Callable[[], object], total: int) -> float:
    """Calls/s of ``THREADS`` threads sharing one proxy."""
    each = total // THREADS
    start = threading.Barrier(THREADS + 1)

    def run() -> None:
        start.wait()
        for _ in range(each):
            call()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return each * THREADS / (time.perf_counter() - started)


def fig_async(slots: list[Slot], s: Settings) -> Section:
    import pipe_rpc

    del slots  # the figure starts its own children
    rounds = 3 if s.quick else 9
    calls = 300 if s.quick else 2_000
    slow_calls = 100 if s.quick else 500  # to_thread and the process pool executor
    burst = 2_000 if s.quick else 20_000
    section = Section(
        "async",
        f"asyncio and futures: latency p50 of add(1, 2) in microseconds ({calls} calls/round), "
        f"and calls/s of {IN_FLIGHT} concurrent acalls vs {THREADS} threads ({burst} "
        f"calls/round); {rounds} rounds, median",
        ["measure", "value", "reference", "x"],
    )
    values: dict[str, list[float]] = {
        k: [] for k in ("sync", "acall", "submit", "to_thread", "executor", "gather", "threads")
    }
    method = start_method(s.start_method)
    server = pipe_rpc.spawn(Service, start_method=method)
    wide = pipe_rpc.spawn(Service, start_method=method, max_concurrency=CONCURRENCY)
    executor = ProcessPoolExecutor(1, mp_context=context(s.start_method))
    loop = asyncio.new_event_loop()
    try:
        add, wide_add = server.proxy.add, wide.proxy.add
        acall, submit = pipe_rpc.acall, pipe_rpc.submit
        executor.submit(square, 2).result()  # the worker is up

        def run(coroutine: Awaitable[float]) -> float:
            return loop.run_until_complete(coroutine)

        async def in_executor() -> object:
            return await loop.run_in_executor(executor, square, 3)

        for r in range(rounds):
            say(f"    async round {r + 1}/{rounds}")
            values["sync"].append(_p50_sync(lambda: add(1, 2), calls))
            values["acall"].append(run(_p50_async(lambda: acall(add, 1, 2), calls)))
            values["submit"].append(_p50_sync(lambda: submit(add, 1, 2).result(), calls))
            values["to_thread"].append(
                run(_p50_async(lambda: asyncio.to_thread(add, 1, 2), slow_calls))
            )
            values["executor"].append(run(_p50_async(in_executor, slow_calls)))
            values["gather"].append(run(_concurrent_rate(lambda: acall(wide_add, 1, 2), burst)))
            values["threads"].append(_threads_rate(lambda: wide_add(1, 2), burst))
    finally:
        loop.close()
        executor.shutdown(cancel_futures=True)
        wide.close()
        server.close()
    med: dict[str, float] = {k: statistics.median(v) for k, v in values.items()}
    _rows(section, med)
    section.notes.append(
        f"latency rows: one child (max_concurrency=1); throughput rows: one child with "
        f"max_concurrency={CONCURRENCY}; the executor is ProcessPoolExecutor(1) running "
        "a module function"
    )
    section.data = {"rounds": rounds, "calls": calls, "burst": burst, "values": values}
    return section


def _rows(section: Section, med: dict[str, float]) -> None:
    acall = med["acall"]
    rows: list[tuple[str, float, float, str]] = [
        ("await acall(proxy.add), p50 us vs the sync call", acall, med["sync"], "cost"),
        ("submit(proxy.add).result(), p50 us vs the sync call", med["submit"], med["sync"], "cost"),
        ("await asyncio.to_thread(proxy.add), p50 us vs acall", med["to_thread"], acall, "cost"),
        (
            "await run_in_executor(ProcessPoolExecutor), p50 us vs acall",
            med["executor"],
            acall,
            "cost",
        ),
        (
            f"{IN_FLIGHT} concurrent acalls, calls/s vs {THREADS} threads' sync calls",
            med["gather"],
            med["threads"],
            "rate",
        ),
    ]
    for label, value, reference, kind in rows:
        x = value / reference if kind == "cost" else reference / value
        digits = 0 if kind == "rate" else 1
        section.rows.append([label, fmt(value, digits), fmt(reference, digits), f"{x:.2f}"])
