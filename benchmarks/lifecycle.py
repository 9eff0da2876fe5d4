"""Figures 4-7: start-up, crash recovery, death detection, memory over many calls.

Each figure runs every usable system round by round, interleaved (A B C ... A B C ...).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Any

from benchmarks.common import (
    CORE_SYSTEMS,
    JOIN_TIMEOUT,
    Errors,
    Section,
    Settings,
    Slot,
    check,
    child_pid,
    fmt,
    med,
    ratio,
    read_rss_kib,
    say,
    sys_of,
)
from benchmarks.systems import BASELINE, System

# ---------------------------------------------------------------- figure 4


def fig_startup(slots: list[Slot], s: Settings) -> Section:
    methods = s.start_methods
    section = Section(
        "startup",
        "4. Start + first reply, per start method, in ms (new child each time; a first "
        f"discarded warm-up round, then median of {s.start_rounds}); raw B here is a bare "
        "ctx.Process start plus one raw round trip; (x rawB) = cost ratio, same method",
        ["system", *methods],
    )
    errors = Errors()
    times: dict[str, dict[str, list[float]]] = {}
    for r in range(s.start_rounds + 1):
        say(f"  startup round {r}/{s.start_rounds}" + (" (warm-up)" if r == 0 else ""))
        for method in methods:
            for slot in errors.working(slots):
                system = slot.cls()
                with errors.guard(slot.name):
                    try:
                        t0 = time.perf_counter_ns()
                        system.start(method)
                        check(system.add(1, 2), 3, "add(1, 2)")
                        ms = (time.perf_counter_ns() - t0) / 1e6
                    finally:
                        system.close()
                    if r > 0:
                        times.setdefault(slot.name, {}).setdefault(method, []).append(ms)
    for slot in errors.with_numbers(slots, section):
        cells = [slot.name]
        for method in methods:
            v = med(times.get(slot.name, {}).get(method, []))
            cells.append(f"{fmt(v, 1)} ({ratio(v, med(times.get(BASELINE, {}).get(method, [])))})")
        section.rows.append(cells)
    section.notes.append(
        "pipe_rpc: pipe_rpc.spawn(Service, start_method=m) + proxy.add(1, 2); peers: their "
        "own start (manager.start(), executor's first submit, server process + connect)"
    )
    section.data = {"unit": "ms", "per_round": times, "errors": errors.by_name}
    return section


# ---------------------------------------------------------------- figure 5


class CrashReturnedError(Exception):
    """crash() came back with a reply: the child did not die."""


def fig_crash(slots: list[Slot], s: Settings) -> Section:
    methods = s.start_methods
    section = Section(
        "crash",
        "5. Crash to next successful call, per start method, in ms (the service method calls "
        f"os._exit; each round starts every system afresh; median of {s.fault_rounds}); "
        "'x start' = total / the same system's start + first reply in the same round",
        [
            "system",
            "method",
            "error seen",
            "start",
            "to error",
            "to next",
            "total",
            "x start",
            "x rawB",
        ],
    )
    errors = Errors()
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    seen: dict[str, set[str]] = {}
    for r in range(s.fault_rounds):
        say(f"  crash round {r + 1}/{s.fault_rounds}")
        for method in methods:
            for slot in errors.working(slots):
                with errors.guard(slot.name):
                    got = _crash_once(slot.cls(), method, seen.setdefault(slot.name, set()))
                    d = times.setdefault(slot.name, {}).setdefault(method, {})
                    for key, ms in got.items():
                        d.setdefault(key, []).append(ms)
    refs = {m: med(times.get(BASELINE, {}).get(m, {}).get("total", [])) for m in methods}
    for slot in errors.with_numbers(slots, section):
        for method in methods:
            d = times[slot.name].get(method, {})
            total = med(d.get("total", []))
            section.rows.append(
                [
                    slot.name,
                    method,
                    "/".join(sorted(seen.get(slot.name, set()))),
                    fmt(med(d.get("start", [])), 1),
                    fmt(med(d.get("error", [])), 1),
                    fmt(med(d.get("next", [])), 1),
                    fmt(total, 1),
                    fmt(med(d.get("x start", [])), 2),
                    ratio(total, refs[method]),
                ]
            )
    section.notes.append(
        'pipe_rpc runs with restart="on-failure": the next call on the same proxy starts a '
        "fresh child; peers (and the raw loops) close and start again by hand"
    )
    section.notes.append(
        "'to error' is mostly the kernel tearing the child down: its end of the pipe closes "
        "only after its memory is unmapped, and a forked child maps what the parent held "
        f"(parent VmRSS here: {fmt((read_rss_kib(os.getpid()) or 0) / 1024, 0)} MiB)"
    )
    section.data = {"unit": "ms", "per_round": times, "errors": errors.by_name}
    section.data["exceptions"] = {k: sorted(v) for k, v in seen.items()}
    return section


def _crash_once(system: System, method: str, seen: set[str]) -> dict[str, float]:
    """Start ``system``, crash its child, recover, call: the times of each step, in ms."""
    try:
        t0 = time.perf_counter_ns()
        system.start(method)
        check(system.add(1, 2), 3, "add(1, 2)")
        t1 = time.perf_counter_ns()
        try:
            system.crash()
            raise CrashReturnedError("crash() returned")
        except CrashReturnedError:
            raise
        except Exception as exc:  # BrokenProcessPool is a RuntimeError
            seen.add(type(exc).__name__)
        t2 = time.perf_counter_ns()
        system.recover()
        check(system.add(1, 2), 3, "add(1, 2) after the crash")
        t3 = time.perf_counter_ns()
    finally:
        system.close()
    start, total = (t1 - t0) / 1e6, (t3 - t1) / 1e6
    return {
        "start": start,
        "error": (t2 - t1) / 1e6,
        "next": (t3 - t2) / 1e6,
        "total": total,
        "x start": total / start,
    }


# ---------------------------------------------------------------- figure 6


def kill_while_waiting(system: System) -> tuple[float | None, str]:
    """SIGKILL the child while another thread waits in a call; ms until that call raises."""
    pid = child_pid(system)
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        try:
            system.wait()
            outcome["error"] = "wait() returned"
        except Exception as exc:
            outcome["t"] = time.perf_counter_ns()
            outcome["error"] = type(exc).__name__

    thread = threading.Thread(target=waiter, name="waiter", daemon=True)
    thread.start()
    time.sleep(0.05)  # let the request reach the child
    t0 = time.perf_counter_ns()
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        system.restart_hard()  # unblock the waiter before reporting
        thread.join(JOIN_TIMEOUT)
        raise
    thread.join(JOIN_TIMEOUT)
    if thread.is_alive():
        system.restart_hard()
        thread.join(JOIN_TIMEOUT)
        return None, f"no error within {JOIN_TIMEOUT:.0f} s"
    if "t" not in outcome:
        return None, str(outcome.get("error"))
    return (outcome["t"] - t0) / 1e6, str(outcome["error"])


def fig_kill(slots: list[Slot], s: Settings) -> Section:
    section = Section(
        "kill",
        "6. SIGKILL of the child to the error in a caller waiting in a call (wait() sleeps "
        "in the child; the kill comes from the main thread), ms, median of "
        f"{s.fault_rounds}",
        ["system", "error seen", "median ms", "max ms", "x rawB"],
    )
    errors = Errors()
    times: dict[str, list[float]] = {}
    seen: dict[str, set[str]] = {}
    for r in range(s.fault_rounds):
        say(f"  kill round {r + 1}/{s.fault_rounds}")
        for slot in errors.working(slots):
            system = sys_of(slot)
            with errors.guard(slot.name):
                ms, what = kill_while_waiting(system)
                seen.setdefault(slot.name, set()).add(what)
                system.recover()
                if ms is None:
                    raise RuntimeError(what)
                times.setdefault(slot.name, []).append(ms)
    ref = med(times.get(BASELINE, []))
    for slot in errors.with_numbers(slots, section):
        v = med(times[slot.name])
        section.rows.append(
            [
                slot.name,
                "/".join(sorted(seen[slot.name])),
                fmt(v, 2),
                fmt(max(times[slot.name]), 2),
                ratio(v, ref),
            ]
        )
    section.data = {"unit": "ms", "per_round": times, "errors": errors.by_name}
    section.data["exceptions"] = {k: sorted(v) for k, v in seen.items()}
    return section


# ---------------------------------------------------------------- figure 7


def fig_rss(slots: list[Slot], s: Settings) -> Section:
    """Parent and child RSS growth over many add calls, after a warm-up.

    The calls run in interleaved chunks; the parent's growth is summed over each system's
    own chunks.  A system slower than ``rss_calls / rss_budget`` calls per second makes
    fewer calls (as many as fit its budget, judged from the warm-up's rate); raw A, raw B
    and pipe_rpc always make them all.
    """
    section = Section(
        "rss",
        f"7. RSS growth over {s.rss_calls:,} add calls (peers: at most ~{s.rss_budget:.0f} s "
        f"of calls each) after a {s.rss_warmup:,}-call warm-up; VmRSS from /proc, KiB; "
        f"{s.rss_chunks} interleaved chunks, parent growth summed over the system's own chunks",
        ["system", "calls", "parent KiB", "child KiB", "child RSS KiB", "calls/s", "child pid"],
    )
    errors = Errors()
    wanted = [x for x in slots if not s.rss_systems or x.name in s.rss_systems]
    pids: dict[str, int] = {}
    chunk: dict[str, int] = {}
    parent: dict[str, int] = {}
    child0: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for slot in errors.working(wanted):
        with errors.guard(slot.name):
            system = sys_of(slot)
            add = system.add
            t0 = time.perf_counter_ns()
            for _ in range(s.rss_warmup):
                add(1, 2)
            rate = s.rss_warmup / max((time.perf_counter_ns() - t0) / 1e9, 1e-9)
            calls = s.rss_calls
            if slot.name not in CORE_SYSTEMS:  # the library and its baselines do every call
                calls = min(calls, int(rate * s.rss_budget))
            chunk[slot.name] = max(1, calls // s.rss_chunks)
            pids[slot.name] = child_pid(system)
            parent[slot.name] = 0
            seconds[slot.name] = 0.0
    gc.collect()
    for slot in errors.working(wanted):
        rss = read_rss_kib(pids[slot.name])
        if rss is None:
            errors.by_name[slot.name] = "child RSS unreadable"
        else:
            child0[slot.name] = rss
    me = os.getpid()
    for c in range(s.rss_chunks):
        say(f"  rss chunk {c + 1}/{s.rss_chunks}")
        for slot in errors.working(wanted):
            with errors.guard(slot.name):
                add = sys_of(slot).add
                gc.collect()
                before = read_rss_kib(me) or 0
                t0 = time.perf_counter_ns()
                for _ in range(chunk[slot.name]):
                    add(1, 2)
                seconds[slot.name] += (time.perf_counter_ns() - t0) / 1e9
                gc.collect()
                parent[slot.name] += (read_rss_kib(me) or 0) - before
    growth: dict[str, dict[str, Any]] = {}
    for slot in slots:
        if slot not in wanted:
            why = "quick mode" if s.quick else "--rss-systems"
            section.rows.append([slot.name, f"skipped ({why})", "", "", "", "", ""])
            continue
        row = errors.status_row(slot, section)
        if row is not None:
            section.rows.append(row)
            continue
        pid = pids[slot.name]
        end = read_rss_kib(pid)
        if end is None:
            section.rows.append([slot.name, "error: child gone during the run", "", "", "", "", ""])
            continue
        calls = chunk[slot.name] * s.rss_chunks
        child_growth = end - child0[slot.name]
        growth[slot.name] = {
            "calls": calls,
            "parent_kib": parent[slot.name],
            "child_kib": child_growth,
            "child_rss_kib": end,
            "seconds": seconds[slot.name],
            "pid": pid,
        }
        section.rows.append(
            [
                slot.name,
                f"{calls:,}",
                f"{parent[slot.name]:+,}",
                f"{child_growth:+,}",
                f"{end:,}",
                fmt(calls / seconds[slot.name] if seconds[slot.name] else None, 0),
                str(pid),
            ]
        )
    section.notes.append(
        "RSS moves in pages and allocator arenas: tens to hundreds of KiB either way is noise; "
        "a leak of 100 bytes per call would show as ~100 MB over 1,000,000 calls"
    )
    if s.quick and s.rss_systems == CORE_SYSTEMS:
        section.notes.append("quick mode measures only raw A, raw B and pipe_rpc here")
    section.data = {
        "unit": "KiB",
        "max_calls": s.rss_calls,
        "warmup": s.rss_warmup,
        "growth": growth,
        "errors": errors.by_name,
    }
    return section
