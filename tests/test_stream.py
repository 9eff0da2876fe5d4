"""Streaming (contract section 8): generator methods become iterators.

Real children; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import signal
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest

import pipe_rpc
from pipe_rpc._streams import WINDOW_BYTES, WINDOW_ITEMS
from pipe_rpc._wire import BIG_FRAME, FrameReader
from tests.calc_service import CustomError
from tests.services import StartMethod
from tests.stream_services import Streamer

SETTLE = 15.0
METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("method", METHODS)
def test_a_generator_method_returns_an_iterator_of_its_items(method: StartMethod) -> None:
    with pipe_rpc.spawn(Streamer, start_method=method) as streamer:
        rows = streamer.rows(5000)
        assert iter(rows) is rows
        assert list(rows) == list(range(5000))
        assert list(streamer.rows(0)) == []
        assert streamer.counts() == (5000, 2)


def test_the_child_runs_ahead_by_a_bounded_window_only() -> None:
    with pipe_rpc.spawn(Streamer, start_method="fork") as streamer:
        items = streamer.forever()
        assert next(items) == 0
        # The consumer takes nothing more: the child stops within its window.
        time_limit = time.monotonic() + 0.5
        while time.monotonic() < time_limit:
            produced, _ = streamer.counts()
            assert produced <= WINDOW_ITEMS + 1
        big = streamer.forever(64 << 10)
        first = next(big)
        assert isinstance(first, bytes)
        assert len(first) == 64 << 10
        produced_before, _ = streamer.counts()
        time_limit = time.monotonic() + 0.5
        while time.monotonic() < time_limit:
            produced, _ = streamer.counts()
            assert produced - produced_before <= WINDOW_BYTES // (64 << 10) + 2
        items.close()
        big.close()


@pytest.mark.parametrize("how", ["close", "break", "exception", "drop"])
def test_ending_the_iteration_early_closes_the_childs_generator(how: str) -> None:
    with pipe_rpc.spawn(Streamer, start_method="fork") as streamer:
        items = streamer.forever()
        if how == "close":
            assert [next(items) for _ in range(3)] == [0, 1, 2]
            items.close()
            with pytest.raises(StopIteration):  # the rest of a frame in hand is dropped
                next(items)
        elif how == "break":
            for n in items:
                if n == 2:
                    break
            items.close()  # what leaving a for loop over a generator does is ours to do
            assert list(items) == []
        elif how == "exception":
            with pytest.raises(ZeroDivisionError):
                _raise_at_two(items)
        else:
            assert next(items) == 0
            del items
            gc.collect()
        eventually(lambda: streamer.counts()[1] == 1, "the generator's finally")
        assert streamer.add(1, 2) == 3


def test_an_endless_stream_read_three_times_then_dropped() -> None:
    with pipe_rpc.spawn(Streamer, start_method="forkserver") as streamer:
        for _ in range(3):
            items = streamer.forever()
            assert [next(items) for _ in range(3)] == [0, 1, 2]
            del items
        eventually(lambda: streamer.counts()[1] == 3, "three generators closed")


def test_an_open_stream_does_not_hold_up_other_calls() -> None:
    with pipe_rpc.spawn(Streamer, start_method="fork", max_concurrency=1) as streamer:
        items = streamer.forever()
        assert next(items) == 0
        assert [streamer.add(i, 1) for i in range(10)] == list(range(1, 11))
        other = streamer.rows(3)
        assert list(other) == [0, 1, 2]
        assert [next(items) for _ in range(3)] == [1, 2, 3]
        items.close()


def test_an_exception_in_the_generator_comes_out_of_next() -> None:
    with pipe_rpc.spawn(Streamer, start_method="fork") as streamer:
        items = streamer.fails_after(3)
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(CustomError) as raised:
            next(items)
        assert raised.value.code == 3
        assert isinstance(raised.value.__cause__, pipe_rpc.RemoteTraceback)
        assert "fails_after" in str(raised.value.__cause__)
        with pytest.raises(StopIteration):
            next(items)
        # Many items drawn a few at a time: those before the error all come first.
        many = streamer.fails_after(5000)
        taken = [next(many) for _ in range(5000)]
        assert taken == list(range(5000))
        with pytest.raises(CustomError):
            next(many)
        unpicklable = streamer.unpicklable()
        assert next(unpicklable) == 1
        with pytest.raises(pipe_rpc.SerializationError, match="unpicklable"):
            list(unpicklable)
        assert streamer.add(1, 1) == 2


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_the_childs_death_comes_out_of_next(method: StartMethod) -> None:
    with pipe_rpc.spawn(Streamer, start_method=method) as streamer:
        items = streamer.dies_after(2)
        got: list[int] = []
        with pytest.raises(pipe_rpc.WorkerDiedError, match="exited with code 3"):
            got.extend(items)
        # Items of a batch the child had not sent yet die with it.
        assert got == [0, 1][: len(got)]


def test_a_child_killed_mid_stream_fails_the_wait_at_once() -> None:
    server = pipe_rpc.spawn(Streamer, start_method="fork")
    with server as streamer:
        items = streamer.slow(30)
        assert next(items) == 0
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(pipe_rpc.WorkerDiedError, match="SIGKILL"):
            next(items)
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("on_timeout", ["abandon", "kill"])
def test_the_timeout_applies_to_each_items_wait(on_timeout: Any) -> None:
    server = pipe_rpc.spawn(
        Streamer, start_method="fork", timeout=0.3, on_timeout=on_timeout, restart="on-failure"
    )
    with server as streamer:
        first = server.pid
        items = streamer.slow(2)
        assert next(items) == 0
        with pytest.raises(pipe_rpc.CallTimeoutError):
            next(items)
        if on_timeout == "kill":
            eventually(lambda: not _alive(first), "the child to be killed")
        assert pipe_rpc.options(streamer, timeout=SETTLE).add(1, 2) == 3


def test_astream_and_async_generator_methods() -> None:
    async def main() -> None:
        async with await pipe_rpc.aspawn(Streamer, start_method="fork") as streamer:
            assert [n async for n in pipe_rpc.astream(streamer.rows, 300)] == list(range(300))
            assert [n async for n in streamer.arows(5)] == [0, 1, 2, 3, 4]
            assert [n async for n in pipe_rpc.astream(streamer.arows, 3)] == [0, 1, 2]
            endless = pipe_rpc.astream(streamer.forever)
            assert [await anext(endless) for _ in range(3)] == [0, 1, 2]
            await endless.aclose()  # type: ignore[attr-defined]
            deadline = time.monotonic() + SETTLE
            while (await pipe_rpc.acall(streamer.counts))[1] < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), SETTLE))


def _raise_at_two(items: Generator[bytes | int, None, None]) -> None:
    try:
        for n in items:
            if n == 2:
                raise ZeroDivisionError
    finally:
        items.close()


def _alive(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_a_stream_of_big_items_reads_them_into_the_same_few_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each big frame is decoded before the next is read, so its buffer is free again
    for the one after: a new buffer's every page would cost a fault (reading ahead
    made one per item, and the stream ran at a quarter of its speed)."""
    made: list[int] = []
    given = FrameReader._buffer_for

    def counting(reader: FrameReader, size: int) -> mmap.mmap:
        spares = {id(spare) for spare in reader._spares}  # ids only: no reference held
        buffer = given(reader, size)
        if id(buffer) not in spares:
            made.append(size)
        return buffer

    monkeypatch.setattr(FrameReader, "_buffer_for", counting)
    with pipe_rpc.spawn(Streamer, start_method="forkserver") as streamer:
        items = streamer.same(BIG_FRAME + 4096)
        for _ in range(40):
            assert len(next(items)) == BIG_FRAME + 4096
        items.close()
    assert len(made) <= 3, f"{len(made)} buffers made for 40 frames"
