"""pipe_rpc.ray against bare Ray on the same local cluster: per-call latency and 4-thread rate.

    pip install -e '.[ray]'                       # a venv of its own: Ray is large
    python benchmarks/ray_bench.py [--quick] [--json out.json]

Not part of ``benchmarks/run.py`` (its systems are child processes of this
machine, and CI's benchmark venv has no Ray); run by hand. Systems, all
serving ``benchmarks.service.Service`` on a ``ray.init(num_cpus=2)`` cluster,
each on its own actor with ``max_concurrency=1``:

- bare Ray: ``ray.get(actor.add.remote(1, 2))`` on ``ray.remote(Service)``;
- pipe_rpc.ray: ``pipe_rpc.ray.spawn(Service).proxy.add(1, 2)``;
- pipe_rpc (for scale): ``pipe_rpc.spawn(Service).proxy.add(1, 2)``, a child process.

Rounds interleave the systems (A B C A B C ...); figures are medians over
rounds. Nothing is asserted on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pipe_rpc` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402

import pipe_rpc  # noqa: E402
import pipe_rpc.ray as pipe_rpc_ray  # noqa: E402
from benchmarks.service import Service  # noqa: E402

Adder = Callable[[int, int], int]


def latency(add: Adder, calls: int) -> tuple[float, float]:
    """p50 and p99 of one round, in µs."""
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        add(1, 2)
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return times[len(times) // 2] / 1e3, times[int(len(times) * 0.99)] / 1e3


def rate(add: Adder, threads: int, seconds: float) -> float:
    """Calls per second with ``threads`` threads sharing ``add`` for about ``seconds``."""
    counts = [0] * threads
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1, timeout=30)

    def work(index: int) -> None:
        barrier.wait()
        count = 0
        while not stop.is_set():
            add(1, 2)
            count += 1
        counts[index] = count

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    return sum(counts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--json", type=Path, default=None, help="write every round here")
    args = parser.parse_args(argv)
    rounds, calls, seconds = (3, 300, 1.0) if args.quick else (9, 2000, 3.0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    bare_actor: Any = ray.remote(Service).options(max_concurrency=1).remote()

    def bare_add(a: int, b: int) -> int:
        result: int = ray.get(bare_actor.add.remote(a, b))
        return result

    on_ray = pipe_rpc_ray.spawn(Service)
    local = pipe_rpc.spawn(Service)
    systems: dict[str, Adder] = {
        "bare Ray": bare_add,
        "pipe_rpc.ray": on_ray.proxy.add,
        "pipe_rpc (local child)": local.proxy.add,
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "p99": [], "1 thread": [], "4 threads": []} for name in systems
    }
    try:
        for add in systems.values():  # warm up: first calls, imports, worker caches
            latency(add, 200)
        for _ in range(rounds):
            for name, add in systems.items():
                p50, p99 = latency(add, calls)
                results[name]["p50"].append(p50)
                results[name]["p99"].append(p99)
            for name, add in systems.items():
                results[name]["1 thread"].append(rate(add, 1, seconds))
                results[name]["4 threads"].append(rate(add, 4, seconds))
    finally:
        on_ray.close()
        local.close()
        ray.shutdown()

    print(f"Ray {ray.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"{rounds} rounds; medians over rounds; add(1, 2) on an actor with max_concurrency=1")
    header = f"{'system':<24}{'p50 µs':>10}{'p99 µs':>10}{'calls/s 1 thr':>15}{'4 thr':>10}"
    print(header)
    for name, figures in results.items():
        median = {key: statistics.median(values) for key, values in figures.items()}
        print(
            f"{name:<24}{median['p50']:>10.0f}{median['p99']:>10.0f}"
            f"{median['1 thread']:>15,.0f}{median['4 threads']:>10,.0f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"ray": ray.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
