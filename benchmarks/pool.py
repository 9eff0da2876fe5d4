"""Figure 8: pools. ``pipe_rpc.pool`` against the standard library's pools and their peers.

Rows (each measured round by round, interleaved, median over rounds):

- tiny tasks: ``square(x)`` mapped over many items with 2 children: items/s of
  ``pool.map`` (``chunksize="auto"``, and one call per item), ``ProcessPoolExecutor(2).map``
  at its best ``chunksize``,
  ``multiprocessing.Pool(2).imap`` (chunksize 1 and its best), loky and pebble
  if installed, and one pipe_rpc child's sequential call rate;
- CPU-bound tasks of ~5 ms each: wall time against the ideal (total CPU / cores);
- crash recovery: a segfault in one child while another works, to the
  replacement's first answer, against a fresh ``spawn()`` and its first call;
- start-up: ``pool(size=N)`` until every child has answered, against one child's.

The pools use their own defaults for the start method (pipe_rpc: forkserver).
Nothing here asserts on timings.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.common import Section, Settings, Slot, fmt, med, say
from benchmarks.service import PoolService, burn, square

CHUNKSIZES = (1, 100, 1000)


def cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _drain(results: Iterator[Any]) -> None:
    for _ in results:
        pass


def _tiny_systems(
    n: int,
) -> tuple[dict[str, Callable[[], float]], list[Callable[[], object]]]:
    """Each system's one round (seconds to map ``square`` over ``range(n)`` with 2
    workers), and what closes them all."""
    import pipe_rpc

    systems: dict[str, Callable[[], float]] = {}
    pool = pipe_rpc.pool(PoolService, size=2)
    systems["pipe_rpc pool.map chunksize=auto"] = lambda: _timed(
        lambda: _drain(pool.map(pool.proxy.square, range(n), chunksize="auto"))
    )
    systems["pipe_rpc pool.map chunksize=auto unordered"] = lambda: _timed(
        lambda: _drain(pool.map(pool.proxy.square, range(n), ordered=False, chunksize="auto"))
    )
    systems["pipe_rpc pool.map (one call per item)"] = lambda: _timed(
        lambda: _drain(pool.map(pool.proxy.square, range(n)))
    )
    one = pipe_rpc.spawn(PoolService)

    def sequential() -> float:
        call = one.proxy.square
        return _timed(lambda: [call(x) for x in range(n)])

    systems["pipe_rpc one child, sequential calls"] = sequential
    executor = ProcessPoolExecutor(2)
    for chunk in CHUNKSIZES:
        systems[f"ProcessPoolExecutor(2).map chunksize={chunk}"] = _executor_map(executor, n, chunk)
    mp_pool = mp.Pool(2)
    for chunk in CHUNKSIZES:
        systems[f"multiprocessing.Pool(2).imap chunksize={chunk}"] = _imap(mp_pool, n, chunk)
    closers: list[Callable[[], object]] = [
        pool.close,
        one.close,
        executor.shutdown,
        mp_pool.terminate,
        mp_pool.join,
    ]
    if importlib.util.find_spec("loky") is not None:
        import loky

        loky_executor = loky.get_reusable_executor(max_workers=2)
        for chunk in CHUNKSIZES:
            systems[f"loky(2).map chunksize={chunk}"] = _executor_map(loky_executor, n, chunk)
        closers.append(loky_executor.shutdown)
    if importlib.util.find_spec("pebble") is not None:
        import pebble

        pebble_pool = pebble.ProcessPool(max_workers=2)
        for chunk in CHUNKSIZES:
            systems[f"pebble.ProcessPool(2).map chunksize={chunk}"] = _pebble_map(
                pebble_pool, n, chunk
            )
        closers += [pebble_pool.close, pebble_pool.join]
    return systems, closers


def _executor_map(executor: Any, n: int, chunk: int) -> Callable[[], float]:
    return lambda: _timed(lambda: _drain(executor.map(square, range(n), chunksize=chunk)))


def _imap(pool: Any, n: int, chunk: int) -> Callable[[], float]:
    return lambda: _timed(lambda: _drain(pool.imap(square, range(n), chunk)))


def _pebble_map(pool: Any, n: int, chunk: int) -> Callable[[], float]:
    return lambda: _timed(lambda: _drain(pool.map(square, range(n), chunksize=chunk).result()))


def _tiny_rows(s: Settings, section: Section) -> dict[str, list[float]]:
    n = 5_000 if s.quick else 100_000
    rounds = 1 if s.quick else 3
    say(f"  pool: tiny tasks, {n:,} items, {rounds} round(s)")
    systems, closers = _tiny_systems(n)
    rates: dict[str, list[float]] = {name: [] for name in systems}
    try:
        for run in systems.values():  # warm-up: every worker started, caches filled
            run()
        for r in range(rounds):
            say(f"    round {r + 1}/{rounds}")
            for name, run in systems.items():
                rates[name].append(n / run())
    finally:
        for close in closers:
            close()
    best: dict[str, tuple[str, float]] = {}
    for name, values in rates.items():
        family = name.split(" chunksize=")[0]
        rate = med(values) or 0.0
        peer = " chunksize=" in name and not name.startswith("pipe_rpc")
        if peer and (family not in best or rate > best[family][1]):
            best[family] = (name, rate)
    for name, values in rates.items():
        family = name.split(" chunksize=")[0]
        mark = " (best)" if family in best and best[family][0] == name else ""
        section.rows.append([f"{name}{mark}", "items/s", fmt(med(values), 0)])
    return rates


def _burn_share(ready: Any, go: Any, count: int, ms: float) -> None:
    """One plain process's share of the CPU-bound work (the floor row)."""
    ready.set()
    go.wait()
    for _ in range(count):
        burn(ms)


def _plain_processes(size: int, tasks: int, ms: float) -> float:
    """Seconds for ``size`` plain processes, started beforehand, to burn ``tasks``
    tasks of ``ms`` between them: no pool, no messages; what this machine allows."""
    ctx = mp.get_context("forkserver")
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(size)]
    procs = [
        ctx.Process(target=_burn_share, args=(ready, go, tasks // size, ms)) for ready in readies
    ]
    for proc in procs:
        proc.start()
    try:
        for ready in readies:
            ready.wait(60)
        t0 = time.perf_counter()
        go.set()
        for proc in procs:
            proc.join(120)
        return time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


def _cpu_rows(s: Settings, section: Section) -> dict[str, list[float]]:
    import pipe_rpc

    ms = 5.0
    size = cores()
    tasks = 40 * size if s.quick else 200 * size
    rounds = 1 if s.quick else 3
    say(f"  pool: {tasks} CPU-bound tasks of {ms} ms on {size} children")
    ideal = tasks * ms / 1000 / size
    walls: dict[str, list[float]] = {
        "pipe_rpc pool.map": [],
        "ProcessPoolExecutor.map": [],
        "plain processes, no pool (the floor)": [],
    }
    pool = pipe_rpc.pool(PoolService, size=size)
    executor = ProcessPoolExecutor(size)
    try:
        _drain(pool.map(pool.proxy.burn, [1.0] * size))
        _drain(executor.map(burn, [1.0] * size))
        for _ in range(rounds):
            walls["pipe_rpc pool.map"].append(
                _timed(lambda: _drain(pool.map(pool.proxy.burn, [ms] * tasks)))
            )
            walls["ProcessPoolExecutor.map"].append(
                _timed(lambda: _drain(executor.map(burn, [ms] * tasks)))
            )
            walls["plain processes, no pool (the floor)"].append(_plain_processes(size, tasks, ms))
    finally:
        pool.close()
        executor.shutdown()
    least = med(walls["plain processes, no pool (the floor)"]) or ideal
    for name, values in walls.items():
        wall = med(values) or 0.0
        section.rows.append(
            [
                f"{name}: {tasks} tasks x {ms:.0f} ms, size {size}",
                "s (x ideal, x floor)",
                f"{fmt(wall, 2)} ({fmt(wall / ideal, 2)}, {fmt(wall / least, 2)})",
            ]
        )
    section.notes.append(
        f"ideal = total CPU time / cores = {ideal:.2f} s; the floor is {size} plain"
        " processes burning the same tasks with no pool and no messages"
    )
    return walls


def _crash_rows(s: Settings, section: Section) -> dict[str, list[float]]:
    import pipe_rpc

    rounds = 2 if s.quick else 10
    say(f"  pool: crash recovery, {rounds} rounds")
    recover: list[float] = []
    fresh: list[float] = []
    for _ in range(rounds):
        pool = pipe_rpc.pool(PoolService, size=2)
        stop = threading.Event()

        def work(pool: pipe_rpc.Pool[PoolService] = pool, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                pool.proxy.burn(1.0)

        worker = threading.Thread(target=work)
        try:
            worker.start()
            before = set(pool.pids)
            t0 = time.perf_counter()
            try:
                pool.proxy.crash()
            except pipe_rpc.WorkerDiedError:
                pass
            deadline = time.monotonic() + 30
            while not (set(pool.broadcast(pool.proxy.pid)) - before):
                if time.monotonic() > deadline:
                    raise RuntimeError("no replacement answered within 30 s")
            recover.append(time.perf_counter() - t0)
        finally:
            stop.set()
            worker.join(30)
            pool.close()
        t0 = time.perf_counter()
        with pipe_rpc.spawn(PoolService) as service:
            service.pid()
            fresh.append(time.perf_counter() - t0)
    section.rows.append(
        [
            "crash in one child (another working) to the replacement's first answer",
            "ms",
            fmt((med(recover) or 0) * 1000, 1),
        ]
    )
    section.rows.append(
        ["a fresh spawn() + first call, same start method", "ms", fmt((med(fresh) or 0) * 1000, 1)]
    )
    return {"recover": recover, "fresh": fresh}


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time process ``pid`` has had so far (Linux: ``/proc/PID/schedstat``)."""
    try:
        with open(f"/proc/{pid}/schedstat") as file:
            return int(file.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _forkserver_pid() -> int | None:
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def _startup_rows(s: Settings, section: Section) -> dict[str, list[float]]:
    """Start-up of ``pool(size=N)`` against one child's; and against its CPU bound: the
    CPU time the start took (the parent's, the fork server's and every child's until it
    answered) over the cores, since N starts on fewer cores cannot all run at once."""
    import pipe_rpc

    rounds = 2 if s.quick else 10
    sizes = sorted({1, cores(), 8})
    say(f"  pool: start-up of sizes {sizes}, {rounds} rounds")
    times: dict[str, list[float]] = {}
    bounds: dict[str, list[float]] = {}
    for _ in range(rounds + 1):  # the first round starts the forkserver: not kept
        for size in sizes:
            server = _forkserver_pid()
            server_cpu = (_cpu_seconds(server) if server else None) or 0.0
            cpu, t0 = time.process_time(), time.perf_counter()
            pool = pipe_rpc.pool(PoolService, size=size)
            elapsed = time.perf_counter() - t0
            spent: list[float | None] = [time.process_time() - cpu]
            spent += [_cpu_seconds(pid) for pid in pool.pids]
            if server:
                spent.append((_cpu_seconds(server) or 0.0) - server_cpu)
            pool.close()
            times.setdefault(f"size {size}", []).append(elapsed)
            if None not in spent:
                total = sum(x for x in spent if x is not None)
                bounds.setdefault(f"size {size}", []).append(total / min(size, cores()))
    one = med(times["size 1"][1:]) or 0.0
    for name, values in times.items():
        value = med(values[1:]) or 0.0
        section.rows.append(
            [
                f"pool({name}) until every child answered",
                "ms (x one child)",
                f"{fmt(value * 1000, 1)} ({fmt(value / one if one else None, 2)})",
            ]
        )
        bound = med(bounds.get(name, [])[1:])
        if bound:
            ideal = max(bound, one)
            section.rows.append(
                [
                    "  its CPU time / cores (or one child's start, if more)",
                    "ms (x that)",
                    f"{fmt(ideal * 1000, 1)} ({fmt(value / ideal, 2)})",
                ]
            )
    return times | {f"cpu bound {name}": values for name, values in bounds.items()}


def fig_pool(slots: list[Slot], s: Settings) -> Section:
    """Figure 8 (the systems of the other figures are not used here)."""
    section = Section(
        "pool",
        f"8. Pools: pipe_rpc.pool against its peers ({cores()} cores usable, "
        f"{os.cpu_count()} online); medians over rounds",
        ["row", "unit", "value"],
    )
    data: dict[str, Any] = {"cores": cores()}
    for key, rows in [
        ("tiny", _tiny_rows),
        ("cpu", _cpu_rows),
        ("crash", _crash_rows),
        ("startup", _startup_rows),
    ]:
        try:
            data[key] = rows(s, section)
        except Exception as exc:
            section.rows.append([f"{key}: error", type(exc).__name__, str(exc)[:80]])
    section.notes.append(
        "pool.map sends one call per item by default, so that a crash fails only the "
        "item that was running; chunksize='auto' sends quick items in chunks of about "
        "1 ms of a child's work (a crash fails the items of its child's chunks that had "
        "no result yet)"
    )
    section.data = data
    return section
