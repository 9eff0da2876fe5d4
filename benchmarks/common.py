"""What the figures share: the run's settings, a system's slot, a table section, helpers.

Ratios are against raw loop B (and raw loop A) measured in the same run.  A ratio is
always "how many times the cost of raw B": a time divided by raw B's time, or raw B's
rate divided by a rate.  So 1.00 is as fast as raw B and 2.00 is twice as slow.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from benchmarks.systems import PipeRpc, System

JOIN_TIMEOUT = 15.0
#: pipe_rpc and its two baselines: never cut short in figure 7, the only ones there in quick mode.
CORE_SYSTEMS = ("raw A", "raw B", "pipe_rpc")


@dataclass
class Slot:
    """One system of the run and whether it can be used ("" when it can)."""

    cls: type[System]
    system: System | None = None
    status: str = ""

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def ok(self) -> bool:
        return self.system is not None and not self.status


@dataclass
class Settings:
    quick: bool
    start_method: str
    start_methods: tuple[str, ...]
    rounds: int = 15
    lat_calls: int = 2000
    boom_calls: int = 500
    thread_calls: int = 2000
    threads: int = 4
    echo_small_calls: int = 10
    echo_big_calls: int = 1
    echo_rounds: int = 10
    start_rounds: int = 10
    fault_rounds: int = 10
    rss_calls: int = 1_000_000
    rss_warmup: int = 10_000
    rss_chunks: int = 10
    rss_systems: tuple[str, ...] = ()  # empty: all
    rss_budget: float = 60.0  # seconds of calls per system at most (fewer calls if slower)
    echo_budget: float = 90.0  # skip a payload whose one call is predicted to take longer
    echo_slow: float = 5.0  # measure once (no rounds) a payload whose one call takes longer

    @classmethod
    def make(cls, quick: bool, start_method: str, start_methods: tuple[str, ...]) -> Settings:
        if not quick:
            return cls(False, start_method, start_methods)
        return cls(
            True,
            start_method,
            start_methods,
            rounds=3,
            lat_calls=300,
            boom_calls=100,
            thread_calls=300,
            echo_small_calls=3,
            echo_big_calls=1,
            echo_rounds=1,
            start_rounds=1,
            fault_rounds=2,
            rss_calls=20_000,
            rss_warmup=10_000,
            rss_chunks=4,
            rss_systems=CORE_SYSTEMS,
            echo_budget=2.0,
        )


@dataclass
class Section:
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- helpers


def percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(value: float | None, ref: float | None, *, rate: bool = False) -> str:
    if value is None or ref is None or value <= 0 or ref <= 0:
        return "-"
    return f"{(ref / value) if rate else (value / ref):.2f}"


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 and abs(value) < 10:
        digits = 2  # a small rate would round to 0 or 1
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:120]


class Errors:
    """First error of each system in one figure; a system with an error sits the figure out."""

    def __init__(self) -> None:
        self.by_name: dict[str, str] = {}

    @contextmanager
    def guard(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.by_name.setdefault(name, describe(exc))
            say(f"    {name}: {describe(exc)}")

    def ok(self, slot: Slot) -> bool:
        return slot.ok and slot.name not in self.by_name

    def cell(self, slot: Slot) -> str | None:
        """What to print instead of numbers, or None when there are numbers."""
        if not slot.ok:
            return slot.status or "not started"
        if slot.name in self.by_name:
            return "error: " + self.by_name[slot.name]
        return None

    def working(self, slots: Iterable[Slot]) -> Iterator[Slot]:
        """The slots still in the figure, each checked when its turn comes."""
        for slot in slots:
            if self.ok(slot):
                yield slot

    def status_row(self, slot: Slot, section: Section) -> list[str] | None:
        """The row to print instead of numbers, or None when there are numbers."""
        text = self.cell(slot)
        if text is None:
            return None
        return [slot.name, text] + [""] * (len(section.columns) - 2)

    def with_numbers(self, slots: Iterable[Slot], section: Section) -> Iterator[Slot]:
        """Give each slot without numbers its status row in ``section``; yield the others."""
        for slot in slots:
            row = self.status_row(slot, section)
            if row is None:
                yield slot
            else:
                section.rows.append(row)


def sys_of(slot: Slot) -> System:
    assert slot.system is not None
    return slot.system


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of a process from /proc/<pid>/status, in KiB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def child_pid(system: System) -> int:
    """The pid of the child serving calls (asked through a call, so a dead child is replaced)."""
    pid = system.getpid()
    if isinstance(system, PipeRpc) and system.server_pid() != pid:
        raise RuntimeError(f"server.pid is {system.server_pid()}, the child says {pid}")
    return pid


def check(value: object, expected: object, what: str) -> None:
    same: object = value == expected
    if not isinstance(same, bool):  # numpy: elementwise
        same = bool(getattr(same, "all", lambda: False)())
    if not same:
        raise RuntimeError(f"{what} returned a wrong result")
