"""Figures 1-3: latency, calls per second with threads, echo throughput.

Each figure runs every usable system round by round, interleaved (A B C ... A B C ...).
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from benchmarks.common import (
    JOIN_TIMEOUT,
    Errors,
    Section,
    Settings,
    Slot,
    check,
    fmt,
    med,
    percentile,
    ratio,
    say,
    sys_of,
)
from benchmarks.systems import BASELINE, SECOND_BASELINE, System

# ---------------------------------------------------------------- figure 1


def time_add(system: System, n: int) -> list[int]:
    add, clock = system.add, time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        add(1, 2)
        out[i] = clock() - t0
    return out


def time_boom(system: System, n: int) -> list[int]:
    boom, clock = system.boom, time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        try:
            boom()
        except ValueError:
            pass
        out[i] = clock() - t0
    return out


def fig_latency(slots: list[Slot], s: Settings) -> Section:
    section = Section(
        "latency",
        f"1. Latency, sequential: add(1, 2) ({s.lat_calls} calls/round) and boom() "
        f"({s.boom_calls} calls/round) x {s.rounds} rounds; median over rounds of each "
        "round's p50/p99, in microseconds",
        ["system", "call", "p50 us", "p99 us", "p50 x rawB", "p99 x rawB", "p50 x rawA"],
    )
    errors = Errors()
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    for slot in errors.working(slots):
        with errors.guard(slot.name):
            system = sys_of(slot)
            check(system.add(1, 2), 3, "add(1, 2)")
            try:
                system.boom()
                raise RuntimeError("boom() did not raise")
            except ValueError:
                pass
            time_add(system, min(200, s.lat_calls))
            time_boom(system, min(50, s.boom_calls))
    for r in range(s.rounds):
        say(f"  latency round {r + 1}/{s.rounds}")
        for slot in errors.working(slots):
            with errors.guard(slot.name):
                for call, timer, n in (
                    ("add", time_add, s.lat_calls),
                    ("boom", time_boom, s.boom_calls),
                ):
                    ns = timer(sys_of(slot), n)
                    d = samples.setdefault((slot.name, call), {"p50": [], "p99": []})
                    d["p50"].append(percentile(ns, 0.50) / 1000)
                    d["p99"].append(percentile(ns, 0.99) / 1000)

    def m(name: str, call: str, q: str) -> float | None:
        return med(samples.get((name, call), {}).get(q, []))

    for slot in errors.with_numbers(slots, section):
        for call, label in (("add", "add(1, 2)"), ("boom", "boom() raises")):
            p50, p99 = m(slot.name, call, "p50"), m(slot.name, call, "p99")
            section.rows.append(
                [
                    slot.name,
                    label,
                    fmt(p50),
                    fmt(p99),
                    ratio(p50, m(BASELINE, call, "p50")),
                    ratio(p99, m(BASELINE, call, "p99")),
                    ratio(p50, m(SECOND_BASELINE, call, "p50")),
                ]
            )
    section.data = {
        "unit": "us",
        "per_round": {f"{n}|{c}": d for (n, c), d in samples.items()},
        "errors": errors.by_name,
    }
    return section


# ---------------------------------------------------------------- figure 2


class Gang:
    """N threads that share one system and run a fixed number of add calls per round."""

    def __init__(self, system: System, n: int, lock: bool) -> None:
        self.system, self.lock = system, lock
        self.mutex = threading.Lock()  # one lock shared by the gang (used when lock=True)
        self.calls = 0
        self.stopping = False
        self.errors: list[Exception] = []
        self.start_line = threading.Barrier(n + 1)
        self.finish_line = threading.Barrier(n + 1)
        self.threads = [
            threading.Thread(target=self._run, name=f"gang-{i}", daemon=True) for i in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        try:
            add = self.system.thread_adder()
            if self.lock:
                inner, mutex = add, self.mutex

                def add(a: int, b: int) -> int:
                    with mutex:
                        return inner(a, b)

            while True:
                self.start_line.wait(JOIN_TIMEOUT * 4)
                if self.stopping:
                    return
                for _ in range(self.calls):
                    add(1, 2)
                self.finish_line.wait(JOIN_TIMEOUT * 4)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:
            self.errors.append(exc)
            self.start_line.abort()
            self.finish_line.abort()
        finally:
            self.system.release_thread()

    def round(self, calls_per_thread: int) -> float:
        """Seconds for all threads to do their calls."""
        self.calls = calls_per_thread
        t0 = time.perf_counter_ns()
        try:
            self.start_line.wait(JOIN_TIMEOUT * 4)
            self.finish_line.wait(JOIN_TIMEOUT * 4)
        except threading.BrokenBarrierError:
            if self.errors:
                raise self.errors[0] from None
            raise RuntimeError("a thread did not reach the barrier in time") from None
        return (time.perf_counter_ns() - t0) / 1e9

    def close(self) -> None:
        self.stopping = True
        try:
            self.start_line.wait(1.0)
        except threading.BrokenBarrierError:
            pass
        deadline = time.monotonic() + 5.0  # threads stuck in a broken system stay behind
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def fig_threads(slots: list[Slot], s: Settings) -> Section:
    per_thread = max(1, s.thread_calls // s.threads)
    total = per_thread * s.threads
    section = Section(
        "threads",
        f"2. Calls per second: 1 thread vs {s.threads} threads sharing one proxy "
        f"({total} add calls/round x {s.rounds} rounds; median); raw loops need a lock "
        "around each round trip to be shared",
        [
            "system",
            "1 thread/s",
            f"{s.threads} threads/s",
            "1thr x rawB",
            f"{s.threads}thr x rawB",
            "how shared",
        ],
    )
    errors = Errors()
    gangs: dict[str, Gang] = {}
    rates: dict[str, dict[str, list[float]]] = {}
    try:
        for slot in errors.working(slots):
            with errors.guard(slot.name):
                gang = Gang(sys_of(slot), s.threads, slot.cls.needs_lock)
                gangs[slot.name] = gang
                gang.round(max(1, per_thread // 10))  # warm-up: connects, first calls
        for r in range(s.rounds):
            say(f"  threads round {r + 1}/{s.rounds}")
            for slot in errors.working(slots):
                with errors.guard(slot.name):
                    system = sys_of(slot)
                    add, clock = system.add, time.perf_counter_ns
                    t0 = clock()
                    for _ in range(total):
                        add(1, 2)
                    seq = total / ((clock() - t0) / 1e9)
                    par = total / gangs[slot.name].round(per_thread)
                    d = rates.setdefault(slot.name, {"one": [], "many": []})
                    d["one"].append(seq)
                    d["many"].append(par)
    finally:
        for gang in gangs.values():
            gang.close()
    ref = med(rates.get(BASELINE, {}).get("one", []))
    for slot in errors.with_numbers(slots, section):
        one, many = med(rates[slot.name]["one"]), med(rates[slot.name]["many"])
        how = "one Lock per round trip" if slot.cls.needs_lock else "one shared proxy"
        if slot.name == "Pyro5":
            how = "one proxy per thread"
        elif slot.name == "mp.Manager":
            how = "shared proxy, 1 socket/thread"
        section.rows.append(
            [
                slot.name,
                fmt(one, 0),
                fmt(many, 0),
                ratio(one, ref, rate=True),
                ratio(many, ref, rate=True),
                how,
            ]
        )
    section.notes.append(
        f"reference: raw B with 1 thread (a raw pipe cannot be shared by threads without a "
        f"lock); '{s.threads}thr x rawB' = raw B 1-thread rate / this {s.threads}-thread rate"
    )
    section.data = {"unit": "calls/s", "per_round": rates, "errors": errors.by_name}
    return section


# ---------------------------------------------------------------- figure 3


def make_payloads() -> list[tuple[str, Any, int]]:
    payloads: list[tuple[str, Any, int]] = [
        ("1 MiB bytes", os.urandom(1 << 20), 1 << 20),
        ("64 MiB bytes", os.urandom(64 << 20), 64 << 20),
    ]
    try:
        import numpy
    except ImportError:
        return payloads
    array = numpy.random.default_rng(0).random((64 << 20) // 8)
    payloads.append(("64 MiB float64 ndarray", array, int(array.nbytes)))
    return payloads


def fig_echo(slots: list[Slot], s: Settings) -> Section:
    payloads = make_payloads()
    labels = [p[0] for p in payloads]
    section = Section(
        "echo",
        f"3. echo(x) throughput in MB/s (payload bytes / round-trip time / 1e6; each byte "
        f"crosses twice); {s.echo_rounds} round(s), median; (x rawB, x rawA) = cost ratios",
        ["system", *labels],
    )
    errors = Errors()
    speeds: dict[str, dict[str, list[float]]] = {}
    skip: dict[tuple[str, str], str] = {}
    if len(payloads) < 3:
        section.notes.append("numpy not installed: no ndarray payload")
    once: set[tuple[str, str]] = set()  # one call took over echo_slow: not repeated
    probes = (os.urandom(4 << 20), os.urandom(16 << 20))
    for slot in errors.working(slots):
        predicted: float | None = None
        for label, payload, nbytes in payloads:
            if "ndarray" in label and not slot.cls.carries_ndarray:
                skip[(slot.name, label)] = "n/a"
                section.notes.append(f"{slot.name} ndarray n/a: {slot.cls.ndarray_note}")
                continue
            with errors.guard(slot.name):
                if nbytes <= len(probes[0]):  # warm-up and check; big ones are checked below
                    check(sys_of(slot).echo(payload), payload, f"echo({label})")
                    continue
                if predicted is None:
                    predicted = predict_echo_seconds(sys_of(slot), probes, nbytes, s.echo_budget)
                if predicted > s.echo_budget:
                    skip[(slot.name, label)] = f"skipped (~{predicted:.0f} s/call)"
                    section.notes.append(
                        f"{slot.name}: {label} skipped: 4/16 MiB probes predict "
                        f"~{predicted:.0f} s or more per call (time grows faster than size), "
                        f"over this mode's {s.echo_budget:.0f} s budget"
                    )
    for r in range(s.echo_rounds):
        say(f"  echo round {r + 1}/{s.echo_rounds}")
        for label, payload, nbytes in payloads:
            calls = s.echo_small_calls if nbytes <= 1 << 20 else s.echo_big_calls
            for slot in slots:
                key = (slot.name, label)
                if not errors.ok(slot) or key in skip or key in once:
                    continue
                with errors.guard(slot.name):
                    echo = sys_of(slot).echo
                    t0 = time.perf_counter_ns()
                    for _ in range(calls):
                        result = echo(payload)
                    seconds = (time.perf_counter_ns() - t0) / 1e9
                    if r == 0:
                        check(result, payload, f"echo({label})")
                    del result
                    speeds.setdefault(slot.name, {}).setdefault(label, []).append(
                        calls * nbytes / seconds / 1e6
                    )
                    if seconds / calls > s.echo_slow:
                        once.add(key)
                        section.notes.append(
                            f"{slot.name}: {label} took {seconds / calls:.1f} s per call; "
                            "measured in round 1 only (*)"
                        )
    for slot in errors.with_numbers(slots, section):
        cells = [slot.name]
        for label in labels:
            if (slot.name, label) in skip:
                cells.append(skip[(slot.name, label)])
                continue
            v = med(speeds.get(slot.name, {}).get(label, []))
            rb = ratio(v, med(speeds.get(BASELINE, {}).get(label, [])), rate=True)
            ra = ratio(v, med(speeds.get(SECOND_BASELINE, {}).get(label, [])), rate=True)
            star = "*" if (slot.name, label) in once else ""
            cells.append(f"{fmt(v, 0)}{star} ({rb}, {ra})")
        section.rows.append(cells)
    section.data = {
        "unit": "MB/s",
        "per_round": speeds,
        "measured_once": sorted(f"{n}|{p}" for n, p in once),
        "skipped": {f"{n}|{p}": v for (n, p), v in skip.items()},
        "errors": errors.by_name,
    }
    return section


def predict_echo_seconds(
    system: System, probes: tuple[bytes, bytes], nbytes: int, budget: float
) -> float:
    """Seconds one echo of ``nbytes`` would take, from 4 and 16 MiB probes.

    Assumes time grows at least linearly, and as fast as it grew from 4 to 16 MiB.
    """
    small, large = probes
    t0 = time.perf_counter_ns()
    system.echo(small)
    t_small = (time.perf_counter_ns() - t0) / 1e9
    linear = t_small * nbytes / len(small)
    if linear > budget:
        return linear
    t0 = time.perf_counter_ns()
    system.echo(large)
    t_large = (time.perf_counter_ns() - t0) / 1e9
    growth = max(len(large) / len(small), t_large / max(t_small, 1e-9))
    steps = math.log(nbytes / len(large)) / math.log(len(large) / len(small))
    return float(t_large * growth**steps)
