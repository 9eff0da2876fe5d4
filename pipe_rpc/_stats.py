"""Counting calls, errors, timeouts, latency, starts and deaths, in the parent.

``Counters`` is what a server's connections count into, across restarts: no
lock and no allocation per call (``itertools.count`` for the counts, a ring of
the last ``RECENT`` latencies per method, each updated by one C call).
``snapshot()`` makes the frozen ``Stats`` the user sees (attrs classes, built
only then: attrs is imported when stats are first asked for).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._stats_types import MethodStats, Stats

#: How many recent calls of a method the latency figures are taken from.
RECENT = 1024

#: A method's counts as plain data: calls, errors, timeouts, in flight, latencies (ns).
_Raw = tuple[int, int, int, int, list[int]]

#: How a call ended, for ``Counters.end``.
OK, ERROR, TIMEOUT = 0, 1, 2


#: Guards ``MethodCounts.add`` (a chunk's counts, once per chunk).
_ADDING = threading.Lock()


class MethodCounts:
    """One method's counts. Each is an ``itertools.count`` whose ``next()`` is one C
    call, so a call is counted without a lock; the latencies go to a ring whose
    ``append`` is one C call too."""

    __slots__ = ("base", "ended", "errors", "latencies", "started", "timeouts")

    def __init__(self) -> None:
        self.started = itertools.count()
        self.ended = itertools.count()
        self.errors = itertools.count()
        self.timeouts = itertools.count()
        self.latencies: deque[int] = deque(maxlen=RECENT)
        self.base = [0, 0, 0]  # calls, errors and timeouts absorbed from retired counters

    def finish(self, started: int, outcome: int) -> None:
        """The call that began at ``started`` (``perf_counter_ns``) ended with ``outcome``."""
        next(self.ended)
        self.note(started, outcome)

    def note(self, started: int, outcome: int) -> None:
        """How an ended call went (``ended`` is counted already): its latency, unless
        ``started`` is 0 (an interrupt came before the clock was read), and whether it
        failed. A caller whose ``except`` an interrupt may reach counts ``ended``
        first, inline: one C call, with no function start before it for an interrupt
        to land on (the call would stay in flight for good)."""
        if started:
            self.latencies.append(time.perf_counter_ns() - started)
        if outcome == ERROR:
            next(self.errors)
        elif outcome == TIMEOUT:
            next(self.timeouts)

    def add(self, calls: int, errors: int, latency: int) -> None:
        """Count ``calls`` ended calls at once (a map's chunk), ``errors`` of them failed,
        each of which took ``latency`` nanoseconds."""
        with _ADDING:
            self.base[0] += calls
            self.base[1] += errors
        self.latencies.extend(itertools.repeat(latency, min(calls, RECENT)))

    def raw(self) -> _Raw:
        started, ended = _value(self.started), _value(self.ended)
        calls, errors, timeouts = self.base
        return (
            calls + ended,
            errors + _value(self.errors),
            timeouts + _value(self.timeouts),
            started - ended,
            list(self.latencies),
        )


def _value(counter: itertools.count[int]) -> int:
    """How many times ``next()`` was called on ``counter`` (without calling it)."""
    return int(repr(counter)[6:-1])  # "count(7)"


class Counters:
    """A server's counts (or a pool member's, summed by the pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # only for a method's first call, and for starts
        #: Each method's counts, made at its first call (under the lock). A call looks
        #: its own up with ``methods.get``, one C call, and ``of`` only the first time.
        self.methods: dict[str, MethodCounts] = {}
        self.starts = 0
        self.restarts = 0
        self.deaths: dict[str, int] = {}

    def of(self, method: str) -> MethodCounts:
        """The counts of ``method``, made at its first call. (A sync call counts with
        them inline: ``next(m.started)`` and the clock as it starts, ``next(m.ended)``
        and the latency as it returns; two method calls more cost as much as the
        counting itself.)"""
        counts = self.methods.get(method)
        if counts is None:
            with self._lock:
                counts = self.methods.setdefault(method, MethodCounts())
        return counts

    def begin(self, method: str) -> int:
        """A call of ``method`` starts; returns the time to give to ``end``."""
        next(self.of(method).started)
        return time.perf_counter_ns()

    def end(self, method: str, started: int, outcome: int) -> None:
        """A call of ``method`` ended (``OK``, ``ERROR`` or ``TIMEOUT``)."""
        self.methods[method].finish(started, outcome)

    def died(self, reason: str) -> None:
        with self._lock:
            self.deaths[reason] = self.deaths.get(reason, 0) + 1

    def started(self, restart: bool) -> None:
        with self._lock:
            self.starts += 1
            if restart:
                self.restarts += 1

    def absorb(self, other: Counters) -> None:
        """Add the counts of ``other`` (a retired child's) to these, so that it can go."""
        methods, starts, restarts, deaths = other.raw()
        with self._lock:
            for name, (calls, errors, timeouts, _, latencies) in methods.items():
                counts = self.methods.setdefault(name, MethodCounts())
                counts.base[0] += calls
                counts.base[1] += errors
                counts.base[2] += timeouts
                counts.latencies.extend(latencies)
            self.starts += starts
            self.restarts += restarts
            for reason, count in deaths.items():
                self.deaths[reason] = self.deaths.get(reason, 0) + count

    def merged(self, other: Counters) -> Counters:
        """New counts: these and ``other``'s (a retired child's), neither changed. A pool
        takes them in place of its own with one store, so that an interrupt landing
        anywhere in the adding counts the child fully or not at all."""
        merged = Counters()
        merged.absorb(self)
        merged.absorb(other)
        return merged

    def raw(self) -> tuple[dict[str, _Raw], int, int, dict[str, int]]:
        """The counts as plain data (for a pool to sum)."""
        with self._lock:
            methods = dict(self.methods)
            starts, restarts, deaths = self.starts, self.restarts, dict(self.deaths)
        # A name with a dot is the machinery's own (a map's chunk, counted as its items).
        counted = {name: m.raw() for name, m in methods.items() if "." not in name}
        return counted, starts, restarts, deaths


def snapshot(parts: list[Counters]) -> Stats:
    """One frozen ``Stats`` from the counts of one server, or of a pool's members."""
    from ._stats_types import MethodStats, Stats

    methods: dict[str, list[Any]] = {}
    starts = restarts = 0
    deaths: dict[str, int] = {}
    for part in parts:
        raw, part_starts, part_restarts, part_deaths = part.raw()
        starts += part_starts
        restarts += part_restarts
        for reason, count in part_deaths.items():
            deaths[reason] = deaths.get(reason, 0) + count
        for name, (calls, errors, timeouts, in_flight, latencies) in raw.items():
            total = methods.setdefault(name, [0, 0, 0, 0, []])
            total[0] += calls
            total[1] += errors
            total[2] += timeouts
            total[3] += in_flight
            total[4].extend(latencies)
    by_name: dict[str, MethodStats] = {}
    for name, (calls, errors, timeouts, in_flight, latencies) in sorted(methods.items()):
        by_name[name] = MethodStats(
            calls=calls,
            errors=errors,
            timeouts=timeouts,
            in_flight=in_flight,
            p50_us=_percentile(latencies, 0.50),
            p99_us=_percentile(latencies, 0.99),
        )
    return Stats(methods=by_name, starts=starts, restarts=restarts, deaths=deaths)


def _percentile(latencies: list[int], q: float) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0
