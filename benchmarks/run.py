"""Benchmark pipe_rpc against raw multiprocessing.Pipe loops and peers, in one run.

    python benchmarks/run.py            # full (minutes)
    python benchmarks/run.py --quick    # CI smoke: the same table with fewer rounds
    python -m benchmarks.run --json out.json

Every system is started in the same run and the figures interleave them round by
round, so machine drift hits all alike; ratios are to the raw loop B of this run.
Nothing here asserts on timings.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pipe_rpc` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from benchmarks.aio import fig_async  # noqa: E402
from benchmarks.common import Section, Settings, Slot, say  # noqa: E402
from benchmarks.lifecycle import fig_crash, fig_kill, fig_rss, fig_startup  # noqa: E402
from benchmarks.peers import Pyro, Rpyc  # noqa: E402
from benchmarks.pool import fig_pool  # noqa: E402
from benchmarks.report import machine_info, render, write_json  # noqa: E402
from benchmarks.speed import fig_echo, fig_latency, fig_threads  # noqa: E402
from benchmarks.streaming import fig_stream  # noqa: E402
from benchmarks.systems import (  # noqa: E402
    BASELINE,
    Manager,
    PipeRpc,
    PoolExecutor,
    RawA,
    RawB,
    System,
    Unavailable,
    remove_socket_dir,
)

#: All systems, in table order.  Raw B is the baseline the ratios are computed against.
ALL_SYSTEMS: tuple[type[System], ...] = (RawA, RawB, PipeRpc, Manager, PoolExecutor, Rpyc, Pyro)

#: Run order: steady state first, memory before the faults, faults last.
FIGURES: tuple[tuple[str, Callable[[list[Slot], Settings], Section]], ...] = (
    ("latency", fig_latency),
    ("threads", fig_threads),
    ("echo", fig_echo),
    ("stream", fig_stream),
    ("async", fig_async),
    ("rss", fig_rss),
    ("startup", fig_startup),
    ("crash", fig_crash),
    ("kill", fig_kill),
    ("pool", fig_pool),
)
#: Printed order: the figure numbers.
PRINT_ORDER = (
    "latency",
    "threads",
    "echo",
    "startup",
    "crash",
    "kill",
    "rss",
    "stream",
    "async",
    "pool",
)

METHODS = ("fork", "forkserver", "spawn")
HELPERS = ("forkserver", "resource_tracker")  # multiprocessing's own helpers end with us


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: fewer rounds")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "latest.json",
        help="where to write the JSON results (default: benchmarks/results/latest.json)",
    )
    parser.add_argument(
        "--start-method",
        choices=METHODS,
        default=None,
        help="start method of the long-lived children (default: the platform's default)",
    )
    parser.add_argument(
        "--systems", default="", help="comma-separated subset of systems (raw B is always kept)"
    )
    parser.add_argument("--figures", default="", help="comma-separated subset of figures")
    parser.add_argument(
        "--rss-calls", type=int, default=None, help="calls for figure 7 (default 1e6 / quick 2e4)"
    )
    parser.add_argument(
        "--rss-systems", default="", help="comma-separated systems for figure 7 (default: all)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="kill every child and stop after this many seconds (default 180 quick / 3600 full)",
    )
    return parser.parse_args(argv)


def norm(name: str) -> str:
    return name.replace(" ", "").replace(".", "").replace("_", "").lower()


def pick(names: str, choices: list[str]) -> list[str]:
    wanted = {norm(n) for n in names.split(",") if n.strip()}
    unknown = wanted - {norm(c) for c in choices}
    if unknown:
        raise SystemExit(f"unknown name(s) {sorted(unknown)}; choose from {choices}")
    return [c for c in choices if norm(c) in wanted]


# ---------------------------------------------------------------- child processes


def descendants() -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of this process, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    out = []
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                out.append((pid, cmdline.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return out


def kill_leftovers(grace: float) -> list[str]:
    """Kill by pid whatever this run started and did not end (multiprocessing's own
    helpers excepted: they end when we exit).  Returns what it had to kill."""
    deadline = time.monotonic() + grace
    while True:
        left = [(p, c) for p, c in descendants() if not any(h in c for h in HELPERS)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"{pid} {cmd[:80]}" for pid, cmd in left]


class Watchdog:
    """Bounds the whole run: past the limit it kills every child by pid and exits."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        if self.done.wait(self.limit):
            return
        say(f"watchdog: run exceeded {self.limit:.0f} s; killing children and exiting")
        for pid, _ in descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(3)

    def stop(self) -> None:
        self.done.set()


# ---------------------------------------------------------------- main


def start_slots(names: list[str], method: str) -> list[Slot]:
    slots = []
    for cls in ALL_SYSTEMS:
        if cls.name not in names:
            continue
        slot = Slot(cls)
        slots.append(slot)
        try:
            cls.check_available()
        except Unavailable as exc:
            slot.status = f"unavailable: {exc}" if cls is PipeRpc else str(exc)
            continue
        system = cls()
        try:
            system.start(method)
            if system.add(1, 2) != 3:
                raise RuntimeError("add(1, 2) != 3")
        except Exception as exc:
            word = "unavailable" if cls is PipeRpc else "failed"
            slot.status = f"{word}: start failed: {type(exc).__name__}: {exc}"[:200]
            try:
                system.close()
            except Exception:
                pass
            continue
        slot.system = system
        say(f"  started {cls.name}")
    return slots


def revive(slots: list[Slot]) -> None:
    """Between figures: a system whose child is not answering gets one recover()."""
    for slot in slots:
        if not slot.ok:
            continue
        system = slot.system
        assert system is not None
        try:
            if system.add(1, 2) == 3:
                continue
        except Exception:
            pass
        try:
            system.recover()
            if system.add(1, 2) != 3:
                raise RuntimeError("add(1, 2) != 3")
        except Exception as exc:
            slot.status = f"failed after recovery: {type(exc).__name__}: {exc}"[:200]


def byte_compile() -> None:
    """Write the .pyc files of pipe_rpc and of these benchmarks, as an installed package has.

    A child started by spawn or forkserver imports both; without cached bytecode (an
    editable install under PYTHONDONTWRITEBYTECODE) it would compile them on every
    start, which is not what an installed pipe_rpc, or the raw loops, would pay.
    """
    import compileall

    import pipe_rpc

    for folder in [*pipe_rpc.__path__, os.path.dirname(os.path.abspath(__file__))]:
        compileall.compile_dir(folder, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    method = args.start_method or mp.get_start_method()
    methods = tuple(m for m in METHODS if m in mp.get_all_start_methods())
    settings = Settings.make(args.quick, method, methods)
    all_names = [cls.name for cls in ALL_SYSTEMS]
    names = pick(args.systems, all_names) if args.systems else all_names
    if BASELINE not in names:
        names.append(BASELINE)
    if args.rss_calls is not None:
        settings.rss_calls = args.rss_calls
    if args.rss_systems:
        settings.rss_systems = tuple(pick(args.rss_systems, all_names))
    keys = [k for k, _ in FIGURES]
    chosen = pick(args.figures, keys) if args.figures else keys
    watchdog = Watchdog(args.time_limit or (180.0 if args.quick else 3600.0))
    byte_compile()
    say(f"pipe_rpc benchmarks: {'quick' if args.quick else 'full'} mode, start method {method}")
    slots: list[Slot] = []
    sections: dict[str, Section] = {}
    leftovers: list[str] = []
    try:
        slots = start_slots(names, method)
        for key, figure in FIGURES:
            if key not in chosen:
                continue
            say(f"figure {key} ({time.monotonic() - began:.0f} s)")
            sections[key] = figure(slots, settings)
            revive(slots)
    finally:
        say(f"closing ({time.monotonic() - began:.0f} s)")
        for slot in slots:
            if slot.system is not None:
                t0 = time.monotonic()
                try:
                    slot.system.close()
                except Exception as exc:
                    say(f"  closing {slot.name}: {type(exc).__name__}: {exc}")
                if time.monotonic() - t0 > 1.0:
                    say(f"  closing {slot.name} took {time.monotonic() - t0:.1f} s")
        remove_socket_dir()
        leftovers = kill_leftovers(grace=5.0)
        watchdog.stop()
        say(f"closed ({time.monotonic() - began:.0f} s)")
    elapsed = time.monotonic() - began
    ordered = [sections[k] for k in PRINT_ORDER if k in sections]
    if leftovers:
        ordered.append(
            Section(
                "cleanup", "Children still alive after close() (killed by pid):", ["pid command"]
            )
        )
        ordered[-1].rows = [[x] for x in leftovers]
    info = machine_info(ROOT)
    table = render(ordered, slots, info, settings, elapsed)
    print(table, end="")
    write_json(args.json, ordered, slots, info, settings, elapsed, table)
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
