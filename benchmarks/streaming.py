"""The ``stream`` figure: a generator method streamed through pipe_rpc (contract section 8).

Its own children, started in the figure, so it needs nothing of the other systems:
one pipe_rpc child serving :class:`StreamService` (``max_concurrency=1``), and a
Pyro5 daemon serving the same generator when Pyro5 is installed. Rounds interleave
the measurements, values are medians over rounds, and ratios read as speed-ups here
(stream rate / reference rate: higher is better), unlike the cost ratios of the
other figures.

- small items: ``count(n)`` streams ints; the reference is a loop that fetches one
  item per call (``item(i)``) on the same proxy, and Pyro5's own generator
  streaming (one round trip per item, as Pyro5 streams).
- big items: ``blobs(n)`` streams the same 1 MiB ``bytes`` ``n`` times, in MB/s
  (bytes / time / 1e6, each byte crosses once); the reference is ``echo`` of 1 MiB
  on the same proxy, in the MB/s of figure 3 (payload / round trip / 1e6).
- memory: VmRSS of parent and child before and after a long stream of 64 KiB items
  read by a slow consumer (it sleeps 0.5 ms per item), after a warm-up.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from benchmarks.common import Section, Settings, Slot, fmt, read_rss_kib, say
from benchmarks.service import die_with_parent
from benchmarks.systems import STEP_TIMEOUT, context, socket_dir, start_method, stop_process

MiB = 1 << 20


class StreamService:
    """Generator methods to stream, and the one-call-per-item and echo references."""

    def __init__(self) -> None:
        self.blob = b""

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    def item(self, i: int) -> int:
        return i

    def blobs(self, n: int, size: int = MiB) -> Iterator[bytes]:
        if len(self.blob) != size:
            self.blob = os.urandom(size)
        for _ in range(n):
            yield self.blob

    def echo(self, x: Any) -> Any:
        return x

    def getpid(self) -> int:
        return os.getpid()


def pyro_stream_child(path: str, ready: Connection, runner_pid: int) -> None:
    """Pyro5 server side: a daemon on a unix socket serving ``count`` and ``item``."""
    die_with_parent(runner_pid)
    import Pyro5.api

    @Pyro5.api.expose
    class PyroStream:
        def count(self, n: int) -> Iterator[int]:
            yield from range(n)

        def item(self, i: int) -> int:
            return i

    daemon = Pyro5.api.Daemon(unixsocket=path)
    uri = daemon.register(PyroStream(), "stream")
    ready.send(str(uri))
    ready.close()
    daemon.requestLoop()


class PyroStream:
    """A Pyro5 daemon in a child and a proxy to it (serializer marshal, as figure 3)."""

    def __init__(self, method: str) -> None:
        import Pyro5.api

        ctx = context(method)
        path = os.path.join(socket_dir(), f"pyro-stream-{os.getpid()}.sock")
        if os.path.exists(path):
            os.unlink(path)
        ours, theirs = ctx.Pipe(duplex=False)
        self.process: BaseProcess = ctx.Process(
            target=pyro_stream_child, args=(path, theirs, os.getpid()), daemon=True
        )
        self.process.start()
        theirs.close()
        if not ours.poll(STEP_TIMEOUT):
            stop_process(self.process)
            raise RuntimeError("the Pyro5 daemon did not report its URI in time")
        self.proxy: Any = Pyro5.api.Proxy(ours.recv())
        ours.close()
        self.proxy._pyroSerializer = "marshal"
        self.proxy._pyroBind()

    def close(self) -> None:
        try:
            self.proxy._pyroRelease()
        finally:
            stop_process(self.process)


def _rate(work: Callable[[], int]) -> float:
    """``work()`` returns how many units it did; units per second."""
    started = time.perf_counter()
    units = work()
    return units / (time.perf_counter() - started)


def _consume(items: Iterator[Any], expected: int) -> int:
    got = 0
    for _ in items:
        got += 1
    if got != expected:
        raise RuntimeError(f"the stream gave {got} items, not {expected}")
    return got


def _slow_rss(proxy: StreamService, child: int, seconds: float) -> dict[str, Any]:
    """Stream 64 KiB items for ``seconds`` with a consumer that sleeps 0.5 ms per item:
    VmRSS (KiB) of parent and child after a warm-up, once the stream's window has
    filled (its first 2,000 items taken), at the end, and the highest seen."""
    size = 64 << 10
    _consume(proxy.blobs(2000, size), 2000)  # warm-up: both sides' buffers and caches
    parent = os.getpid()
    base = {"parent": read_rss_kib(parent) or 0, "child": read_rss_kib(child) or 0}
    high = dict(base)
    items = proxy.blobs(1 << 40, size)
    taken = 0
    filled: dict[str, int] = {}
    began = time.monotonic()
    for _ in items:
        taken += 1
        time.sleep(0.0005)
        if taken == 2000:
            filled = {"parent": read_rss_kib(parent) or 0, "child": read_rss_kib(child) or 0}
        if taken % 1000 == 0:
            for who, pid in (("parent", parent), ("child", child)):
                high[who] = max(high[who], read_rss_kib(pid) or 0)
            if time.monotonic() - began >= seconds:
                break
    items.close()  # type: ignore[attr-defined]
    elapsed = time.monotonic() - began
    end = {"parent": read_rss_kib(parent) or 0, "child": read_rss_kib(child) or 0}
    return {
        "items": taken,
        "bytes": taken * size,
        "seconds": elapsed,
        "base": base,
        "filled": filled or base,
        "end": end,
        "high": high,
    }


def fig_stream(slots: list[Slot], s: Settings) -> Section:
    import pipe_rpc

    del slots  # the figure starts its own children
    quick = s.quick
    rounds = 3 if quick else 5
    small_items = 100_000 if quick else 1_000_000
    loop_calls = 2_000 if quick else 20_000
    pyro_items = 2_000 if quick else 20_000
    big_items = 32 if quick else 512
    echo_calls = 8 if quick else 64
    rss_seconds = 2.0 if quick else 60.0
    section = Section(
        "stream",
        f"Streaming: a generator method through pipe_rpc ({rounds} rounds, median); "
        "x = stream rate / reference rate (higher is better)",
        ["measure", "pipe_rpc stream", "reference", "x"],
    )
    rates: dict[str, list[float]] = {
        k: [] for k in ("small", "loop", "pyro", "pyro loop", "big MB/s", "echo MB/s")
    }
    server = pipe_rpc.spawn(StreamService, start_method=start_method(s.start_method))
    pyro: PyroStream | None = None
    try:
        proxy = server.proxy
        if importlib.util.find_spec("Pyro5") is not None:
            try:
                pyro = PyroStream(s.start_method)
            except Exception as exc:  # a peer that will not start leaves its row out
                section.notes.append(f"Pyro5 did not start: {type(exc).__name__}: {exc}")
        else:
            section.notes.append("Pyro5 not installed: no Pyro5 row")
        blob = os.urandom(MiB)
        peer: Any = None if pyro is None else pyro.proxy
        _consume(proxy.count(10_000), 10_000)  # warm-up
        _consume(proxy.blobs(4), 4)
        for r in range(rounds):
            say(f"    round {r + 1}/{rounds}")
            rates["small"].append(_rate(lambda: _consume(proxy.count(small_items), small_items)))
            rates["loop"].append(_rate(lambda: _loop(proxy.item, loop_calls)))
            if pyro is not None:
                rates["pyro"].append(_rate(lambda: _consume(peer.count(pyro_items), pyro_items)))
                rates["pyro loop"].append(_rate(lambda: _loop(peer.item, pyro_items)))
            rates["big MB/s"].append(
                _rate(lambda: _consume(proxy.blobs(big_items), big_items) * MiB) / 1e6
            )
            rates["echo MB/s"].append(_rate(lambda: _echo(proxy, blob, echo_calls)) / 1e6)
        say(f"    slow consumer for {rss_seconds:.0f} s")
        child = proxy.getpid()
        rss = _slow_rss(proxy, child, rss_seconds)
    finally:
        if pyro is not None:
            pyro.close()
        server.close()
    med = {k: statistics.median(v) if v else None for k, v in rates.items()}
    section.rows.append(
        [
            "small items (ints), items/s vs one item per call (calls/s)",
            fmt(med["small"], 0),
            fmt(med["loop"], 0),
            _x(med["small"], med["loop"]),
        ]
    )
    if med["pyro"] is not None:
        section.rows.append(
            [
                "the same vs Pyro5 generator streaming, items/s",
                fmt(med["small"], 0),
                fmt(med["pyro"], 0),
                _x(med["small"], med["pyro"]),
            ]
        )
        section.rows.append(
            ["(Pyro5: one item per call, calls/s)", "", fmt(med["pyro loop"], 0), ""]
        )
    section.rows.append(
        [
            "1 MiB bytes items, MB/s vs echo 1 MiB on the same proxy, MB/s",
            fmt(med["big MB/s"], 0),
            fmt(med["echo MB/s"], 0),
            _x(med["big MB/s"], med["echo MB/s"]),
        ]
    )
    for who in ("parent", "child"):
        grew = rss["end"][who] - rss["base"][who]
        highest = rss["high"][who] - rss["base"][who]
        window = rss["filled"][who] - rss["base"][who]
        since = rss["end"][who] - rss["filled"][who]
        section.rows.append(
            [
                f"{who} VmRSS growth over {rss['bytes'] / 1e9:.1f} GB of 64 KiB items, slow "
                f"consumer, {rss['seconds']:.0f} s: end / highest (the window's part / "
                "after it filled)",
                f"{grew:+,} / {highest:+,} ({window:+,} / {since:+,}) KiB",
                "",
                "",
            ]
        )
    section.notes.append(
        "a shared 2-core machine: rates drift between rounds; see data for every round"
    )
    section.data = {
        "rounds": rounds,
        "small_items": small_items,
        "loop_calls": loop_calls,
        "pyro_items": pyro_items,
        "big_items": big_items,
        "echo_calls": echo_calls,
        "rates": rates,
        "medians": med,
        "rss_kib": rss,
    }
    return section


def _loop(fetch: Callable[[int], int], calls: int) -> int:
    for i in range(calls):
        if fetch(i) != i:
            raise RuntimeError("item(i) returned a wrong item")
    return calls


def _echo(proxy: StreamService, blob: bytes, calls: int) -> int:
    for _ in range(calls):
        if len(proxy.echo(blob)) != len(blob):
            raise RuntimeError("echo returned a wrong payload")
    return calls * len(blob)


def _x(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}"
