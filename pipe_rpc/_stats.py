"""Counting calls, errors, timeouts, latency, starts and deaths, in the parent.

``Counters`` is what a server's connections count into, across restarts: one
lock taken twice a call (as it starts and as it ends), a few integer updates,
and the call's latency kept in a ring of the last ``RECENT`` calls per method.
``snapshot()`` makes the frozen ``Stats`` the user sees (attrs classes, built
only then: attrs is imported when stats are first asked for).
"""

from __future__ import annotations

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


class _Method:
    __slots__ = ("calls", "errors", "in_flight", "latencies", "timeouts")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.in_flight = 0
        self.latencies: deque[int] = deque(maxlen=RECENT)


class Counters:
    """A server's counts (or a pool member's, summed by the pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, _Method] = {}
        self.starts = 0
        self.restarts = 0
        self.deaths: dict[str, int] = {}

    def begin(self, method: str) -> int:
        """A call of ``method`` starts; returns the time to give to ``end``."""
        with self._lock:
            counts = self._methods.get(method)
            if counts is None:
                counts = self._methods[method] = _Method()
            counts.in_flight += 1
        return time.perf_counter_ns()

    def end(self, method: str, started: int, outcome: int) -> None:
        """A call of ``method`` ended (``OK``, ``ERROR`` or ``TIMEOUT``)."""
        elapsed = time.perf_counter_ns() - started
        with self._lock:
            counts = self._methods[method]
            counts.in_flight -= 1
            counts.calls += 1
            if outcome == ERROR:
                counts.errors += 1
            elif outcome == TIMEOUT:
                counts.timeouts += 1
            counts.latencies.append(elapsed)

    def died(self, reason: str) -> None:
        with self._lock:
            self.deaths[reason] = self.deaths.get(reason, 0) + 1

    def started(self, restart: bool) -> None:
        with self._lock:
            self.starts += 1
            if restart:
                self.restarts += 1

    def raw(
        self,
    ) -> tuple[dict[str, tuple[int, int, int, int, list[int]]], int, int, dict[str, int]]:
        """The counts as plain data (for a pool to sum)."""
        with self._lock:
            methods = {
                name: (m.calls, m.errors, m.timeouts, m.in_flight, list(m.latencies))
                for name, m in self._methods.items()
            }
            return methods, self.starts, self.restarts, dict(self.deaths)


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
