"""``pipe_rpc.pool``: many children behind one proxy, with real processes.

Tests that start, kill or replace children from the test's one thread run
under every start method. Tests with threads in the parent (``map``, a call
held in another thread) use ``forkserver`` and ``spawn``: forking a
multi-threaded parent is what Python 3.12+ warns about, and the pool's own
default never does it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

import pipe_rpc
from pipe_rpc._pool_map import _MAX_CHUNK
from tests.calc_service import CalcService
from tests.pool_services import Failing, Flaky, Rendezvous, Stuck, Worker

StartMethod = Literal["fork", "forkserver", "spawn"]
METHODS: tuple[StartMethod, ...] = ("fork", "forkserver", "spawn")
THREADED: tuple[StartMethod, ...] = ("forkserver", "spawn")
SETTLE = 20.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = SETTLE) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def gone(pid: int) -> bool:
    """No process ``pid`` at all: ended and reaped (a zombie still answers signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def release(gate: Path) -> None:
    """Open the FIFO ``gate`` for writing and close it: a child reading it goes on."""
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            if time.monotonic() > deadline:
                pytest.fail(f"nobody came to read {gate}")
            time.sleep(0.005)
            continue
        os.close(fd)
        return


def all_ready(pool: pipe_rpc.Pool[Worker] | pipe_rpc.Pool[Flaky]) -> bool:
    return len(pool.broadcast(pool.proxy.pid)) == pool.size


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    path = tmp_path / "gate"
    os.mkfifo(path)
    return path


@pytest.fixture
def pools() -> Iterator[list[pipe_rpc.Pool[Worker]]]:
    """Pools made by a test, closed after it whatever happened."""
    made: list[pipe_rpc.Pool[Worker]] = []
    yield made
    for pool in made:
        pool.close(timeout=1.0)


# -- starting ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_children_start_in_parallel(method: StartMethod, tmp_path: Path) -> None:
    """Each child's factory waits until all three have begun: one at a time would fail."""
    factory = functools.partial(Rendezvous, str(tmp_path), 3, 15.0)
    with pipe_rpc.pool(factory, size=3, start_method=method) as proxy:
        assert proxy.square(3) == 9
    assert len(os.listdir(tmp_path)) == 3


def test_size_defaults_to_the_usable_cpus() -> None:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    pool = pipe_rpc.pool(Worker, size=None)
    try:
        assert pool.size == count
        assert len(set(pool.pids)) == count
    finally:
        pool.close()


def test_a_factory_that_fails_at_start_stops_every_child(tmp_path: Path) -> None:
    with pytest.raises(pipe_rpc.StartupError, match="always fails"):
        pipe_rpc.pool(functools.partial(Failing, str(tmp_path)), size=2)
    pids = [int(name) for name in os.listdir(tmp_path)]
    assert pids
    assert all(gone(pid) for pid in pids)


def test_start_timeout_kills_a_stuck_start(tmp_path: Path) -> None:
    with pytest.raises(pipe_rpc.StartupError, match=r"start_timeout=0\.5"):
        pipe_rpc.pool(functools.partial(Stuck, str(tmp_path)), size=2, start_timeout=0.5)
    pids = [int(name) for name in os.listdir(tmp_path)]
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)


def test_spawn_start_timeout_kills_a_stuck_start(tmp_path: Path) -> None:
    """The same bound for one child (the pool passes it on to each of its own)."""
    with pytest.raises(pipe_rpc.StartupError, match=r"start_timeout=0\.5"):
        pipe_rpc.spawn(functools.partial(Stuck, str(tmp_path)), start_timeout=0.5)
    (pid,) = (int(name) for name in os.listdir(tmp_path))
    assert gone(pid)
    with pipe_rpc.spawn(Worker, start_timeout=30.0) as worker:
        assert worker.square(3) == 9


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("size", 0),
        ("size", True),
        ("max_calls_per_child", 0),
        ("max_memory_per_child", -1),
        ("timeout", 0),
        ("start_timeout", -1.0),
        ("on_timeout", "explode"),
        ("start_method", "fork-bomb"),
    ],
)
def test_options_out_of_range(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        pipe_rpc.pool(Worker, **{option: value})  # type: ignore[arg-type]


# -- dispatch --------------------------------------------------------------------


@pytest.mark.parametrize("method", THREADED)
def test_a_call_goes_to_the_least_busy_child(
    method: StartMethod, gate: Path, tmp_path: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method=method)
    pools.append(pool)
    marker = tmp_path / "held"
    held: list[int] = []
    thread = threading.Thread(target=lambda: held.append(pool.proxy.hold(str(gate), str(marker))))
    thread.start()
    try:
        wait_for(marker.exists, "the held call to reach its child")
        busy = int(marker.read_text())
        (idle,) = set(pool.pids) - {busy}
        assert {pool.proxy.pid() for _ in range(10)} == {idle}
    finally:
        release(gate)
        thread.join(SETTLE)
    assert held == [busy]
    # Both idle again: calls from one thread stay on one child.
    assert len({pool.proxy.pid() for _ in range(10)}) == 1


# -- death -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_crash_fails_only_its_call_and_the_child_is_replaced(
    method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method=method)
    pools.append(pool)
    before = pool.pids
    with pytest.raises(pipe_rpc.WorkerDiedError) as info:
        pool.proxy.parse(-1)
    assert info.value.exitcode == -signal.SIGSEGV
    dead = set(before) - set(pool.pids)
    assert len(dead) == 1
    assert pool.proxy.parse(21) == 42  # the other child, or the replacement
    wait_for(lambda: all_ready(pool), "the replacement to answer")
    after = pool.pids
    assert len(after) == 2
    assert not dead & set(after)
    assert set(pool.broadcast(pool.proxy.pid)) == set(after)


def test_a_replacement_being_launched_in_another_thread_is_in_pids(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    """A thread that saw the death starts the replacement; ``pids`` read meanwhile in
    another thread waits for that start instead of showing the pool a child short."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    children = pool._workers
    make = children._make
    launching, go = threading.Event(), threading.Event()

    def held_make() -> pipe_rpc.Server[Worker]:
        launching.set()
        assert go.wait(SETTLE)
        return make()

    children._make = held_make
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: gone(victim), "the victim to end")
    noticing = threading.Thread(target=lambda: pool.pids)
    noticing.start()
    assert launching.wait(SETTLE)
    seen: list[list[int]] = []
    reader = threading.Thread(target=lambda: seen.append(pool.pids))
    reader.start()
    reader.join(0.2)  # it waits for the launch (the check below fails if it did not)
    go.set()
    reader.join(SETTLE)
    noticing.join(SETTLE)
    (pids,) = seen
    assert len(pids) == 2
    assert victim not in pids


def _map_outcomes(results: Iterator[int], count: int) -> list[int | str]:
    outcomes: list[int | str] = []
    for _ in range(count):
        try:
            outcomes.append(next(results))
        except pipe_rpc.WorkerDiedError as exc:
            outcomes.append(f"died: {exc.exitcode}")
    with pytest.raises(StopIteration):
        next(results)
    return outcomes


@pytest.mark.parametrize("method", THREADED)
def test_a_segfault_mid_map_fails_only_that_item(
    method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method=method)
    pools.append(pool)
    before = set(pool.pids)
    items = [*range(20), -1, *range(20, 40), -2, *range(40, 60)]
    outcomes = _map_outcomes(pool.map(pool.proxy.parse, items), len(items))
    assert outcomes == [2 * x if x >= 0 else f"died: {-signal.SIGSEGV}" for x in items]
    wait_for(lambda: all_ready(pool), "the replacements to answer")
    assert before - set(pool.pids)  # (the second crash may take the first one's replacement)


@pytest.mark.parametrize("method", THREADED)
def test_a_segfault_mid_map_of_quick_items_fails_only_items_of_that_childs_chunks(
    method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """With ``chunksize="auto"`` quick items go in chunks: a crash fails the items its
    child had not answered, and no other; every other item has its result, in place."""
    pool = pipe_rpc.pool(Worker, size=2, start_method=method)
    pools.append(pool)
    items = [*range(50_000), -1, *range(50_000, 100_000)]
    results = pool.map(pool.proxy.parse, items, chunksize="auto")
    outcomes = _map_outcomes(results, len(items))
    died = [i for i, outcome in enumerate(outcomes) if outcome == f"died: {-signal.SIGSEGV}"]
    assert 50_000 in died  # the crash's own item
    assert len(died) <= 2 * _MAX_CHUNK  # its chunk, and the one waiting behind it
    for i, (x, outcome) in enumerate(zip(items, outcomes, strict=True)):
        assert i in died or outcome == 2 * x
    # A chunk's items are counted as its future completes, which its failure may
    # reach the consumer just before.
    wait_for(lambda: pool.stats().methods["parse"].calls == len(items), "every item counted")
    assert pool.stats().methods["parse"].errors == len(died)
    assert ".map" not in pool.stats().methods
    wait_for(lambda: all_ready(pool), "the replacement to answer")
    assert list(pool.map(pool.proxy.parse, range(5000), chunksize="auto")) == [
        2 * x for x in range(5000)
    ]


def test_a_child_killed_while_idle_takes_no_call(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    """A child found dead before a call is sent is replaced; the call goes elsewhere."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    first = pool.proxy.pid()  # calls from one thread go to this child
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: gone(first), "the killed child to be reaped")
    assert {pool.proxy.pid() for _ in range(5)} - {first}
    assert first not in pool.pids


def test_on_timeout_kill_replaces_that_child(
    gate: Path, tmp_path: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, on_timeout="kill", start_method="forkserver")
    pools.append(pool)
    marker = tmp_path / "held"
    with pytest.raises(pipe_rpc.CallTimeoutError):
        pipe_rpc.options(pool.proxy, timeout=0.5).hold(str(gate), str(marker))
    killed = int(marker.read_text())
    wait_for(lambda: gone(killed), "the timed-out child to be killed")
    wait_for(lambda: all_ready(pool), "the replacement to answer")
    assert killed not in pool.pids


def test_a_failing_replacement_is_retried_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """The factory fails every other start after the first two: calls go on all along."""
    caplog.set_level(logging.WARNING, logger="pipe_rpc")
    factory = functools.partial(Flaky, str(tmp_path / "starts"), 2)
    pool = pipe_rpc.pool(factory, size=2, start_method="forkserver")
    pools.append(pool)  # type: ignore[arg-type]
    for round_ in range(2):
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), "the killed child to be reaped")  # noqa: B023
        calls = 0

        def replaced() -> bool:
            nonlocal calls
            assert pool.proxy.square(calls) == calls * calls  # every call succeeds
            calls += 1
            return len(pool.pids) == 2 and victim not in pool.pids and all_ready(pool)  # noqa: B023

        wait_for(replaced, f"round {round_}: a replacement that starts")
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipe_rpc"
        and r.levelno == logging.WARNING
        and "could not be replaced" in r.getMessage()
    ]
    assert len(failures) == 2, failures
    assert all("fails on purpose" in message for message in failures)
    assert (tmp_path / "starts").read_text() == "6"  # 2, then two rounds of a failure and a start


def test_with_no_child_running_a_call_gets_the_failed_start(
    tmp_path: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """A pool of one whose replacement fails: a waiting call raises, never hangs."""
    factory = functools.partial(Flaky, str(tmp_path / "starts"), 1)
    pool = pipe_rpc.pool(factory, size=1, start_method="forkserver")
    pools.append(pool)  # type: ignore[arg-type]
    with pytest.raises(pipe_rpc.WorkerDiedError):
        pool.proxy.parse(-1)
    with pytest.raises(pipe_rpc.StartupError, match="fails on purpose"):
        pool.proxy.square(2)
    wait_for(lambda: pool.proxy.square(3) == 9, "the next start, which succeeds")


# -- recycling -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_max_calls_per_child_replaces_children_without_a_failure(
    method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, max_calls_per_child=3, start_method=method)
    pools.append(pool)
    first = set(pool.pids)
    served = [pool.proxy.pid() for _ in range(20)]  # none raises
    counts = {pid: served.count(pid) for pid in served}
    assert max(counts.values()) <= 3
    assert len(counts) >= 7
    retired = set(counts) - set(pool.pids)
    assert first <= retired
    wait_for(lambda: all(gone(pid) for pid in retired), "the retired children to end")


def test_max_memory_per_child_replaces_a_grown_child_without_a_failure(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    probe = pipe_rpc.pool(Worker, size=1, start_method="forkserver")
    try:
        baseline = probe.proxy.rss()
    finally:
        probe.close()
    limit = baseline + (40 << 20)
    pool = pipe_rpc.pool(Worker, size=2, max_memory_per_child=limit, start_method="forkserver")
    pools.append(pool)
    small = pool.proxy.grow(1)  # still under the limit: it stays
    assert pool.proxy.pid() == small
    grown = pool.proxy.grow(60)  # over the limit after this call, which succeeds
    assert grown == small
    wait_for(lambda: gone(grown), "the grown child to be closed")
    assert grown not in pool.pids
    assert pool.proxy.pid() != grown


# -- map -------------------------------------------------------------------------


@pytest.mark.parametrize("method", THREADED)
def test_map_ordered_and_unordered(method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method=method)
    pools.append(pool)
    items = list(range(200))
    assert list(pool.map(pool.proxy.square, items)) == [x * x for x in items]
    assert sorted(pool.map(pool.proxy.square, items, ordered=False)) == [x * x for x in items]
    assert list(pool.map(pool.proxy.square, [])) == []
    results = pool.map(pool.proxy.square, items, chunksize="auto")
    assert iter(results) is results  # an iterator, as a generator is
    assert next(results) == 0
    assert list(results) == [x * x for x in items[1:]]
    with pytest.raises(StopIteration):
        next(results)


def test_map_keeps_max_concurrency_calls_in_each_child(
    gate: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """Two places per child: item 0 holds one of them, the rest go on meanwhile."""
    pool = pipe_rpc.pool(Worker, size=1, max_concurrency=2, start_method="forkserver")
    pools.append(pool)
    results = pool.map(pool.proxy.hold_first, [(x, str(gate)) for x in range(6)], ordered=False)
    assert sorted(next(results) for _ in range(5)) == [1, 2, 3, 4, 5]
    release(gate)
    assert next(results) == 0


def test_map_unordered_yields_results_as_they_come(
    gate: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """Item 0 is held until every other result is in: in order, none would come."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    results = pool.map(pool.proxy.hold_first, [(x, str(gate)) for x in range(6)], ordered=False)
    assert sorted(next(results) for _ in range(5)) == [1, 2, 3, 4, 5]
    release(gate)
    assert next(results) == 0
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("leave", ["close", "drop"])
def test_a_map_left_with_a_call_in_flight_gives_its_child_back(
    leave: str, gate: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """The consumer stops while item 0 is held in a child: once that call ends, its
    child counts no call in flight and takes calls again; nothing waits on the map."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    results = pool.map(pool.proxy.hold_first, [(x, str(gate)) for x in range(6)], ordered=False)
    assert next(results) != 0
    if leave == "close":
        results.close()  # type: ignore[attr-defined]
    else:
        del results
    release(gate)
    wait_for(lambda: pool.stats().methods["hold_first"].in_flight == 0, "the held call to end")
    assert sorted(pool.broadcast(pool.proxy.pid)) == sorted(pool.pids)
    assert list(pool.map(pool.proxy.square, range(10))) == [x * x for x in range(10)]


def test_map_raises_each_failure_at_its_place_and_goes_on(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    results = pool.map(pool.proxy.check, [1, -2, 3, -4, 5])
    assert next(results) == 1
    with pytest.raises(ValueError, match="negative: -2"):
        next(results)
    assert next(results) == 3
    with pytest.raises(ValueError, match="negative: -4"):
        next(results)
    assert next(results) == 5
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("ordered", [True, False])
def test_map_of_quick_items_raises_each_failure_at_its_place_in_a_chunk(
    ordered: bool, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """An item of a chunk that raises, or whose result will not pickle, fails alone,
    with its own exception."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    items = [x if x % 1000 != 999 else -x for x in range(20_000)]
    for method in (pool.proxy.check, pool.proxy.lock_or_square):
        results = pool.map(method, items, ordered=ordered, chunksize="auto")
        outcomes: list[object] = []
        for _ in items:
            try:
                outcomes.append(next(results))
            except (ValueError, pipe_rpc.SerializationError) as exc:
                outcomes.append(type(exc))
        with pytest.raises(StopIteration):
            next(results)
        expected: list[object]
        if method == pool.proxy.check:
            expected = [x if x >= 0 else ValueError for x in items]
        else:
            expected = [x * x if x >= 0 else pipe_rpc.SerializationError for x in items]
        if not ordered:
            outcomes.sort(key=repr)
            expected.sort(key=repr)
        assert outcomes == expected
    stats = pool.stats().methods
    assert (stats["check"].calls, stats["check"].errors) == (len(items), 20)
    assert stats["lock_or_square"].calls == len(items)


def test_map_with_a_timeout_sends_each_item_alone(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    """Each item has its own timeout, so none goes in a chunk, even with ``"auto"``: a
    crash among quick items fails only its own."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver", timeout=30.0)
    pools.append(pool)
    items = [*range(2000), -1, *range(2000, 4000)]
    outcomes = _map_outcomes(pool.map(pool.proxy.parse, items, chunksize="auto"), len(items))
    assert outcomes == [2 * x if x >= 0 else f"died: {-signal.SIGSEGV}" for x in items]


def test_map_with_a_chunksize_fails_at_most_two_chunks_of_a_crashed_child(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    items = [*range(2000), -1, *range(2000, 4000)]
    outcomes = _map_outcomes(pool.map(pool.proxy.parse, items, chunksize=100), len(items))
    died = [i for i, outcome in enumerate(outcomes) if outcome == f"died: {-signal.SIGSEGV}"]
    assert 2000 in died
    assert len(died) <= 200
    assert all(
        i in died or outcome == 2 * x
        for i, (x, outcome) in enumerate(zip(items, outcomes, strict=True))
    )


@pytest.mark.parametrize("chunksize", [0, -1, 1.5, True, None, "fast"])
def test_map_rejects_a_chunksize_that_is_not_a_positive_int(
    chunksize: object, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=1, start_method="forkserver")
    pools.append(pool)
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(pool.proxy.square, range(3), chunksize=chunksize)  # type: ignore[arg-type]


def test_map_raises_the_iterables_error_at_its_place(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)

    def source() -> Iterator[int]:
        yield from range(5)
        raise LookupError("the source broke")

    results = pool.map(pool.proxy.square, source())
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(LookupError, match="the source broke"):
        next(results)
    assert list(results) == []


def test_map_is_lazy_and_bounded(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    """An endless iterable: ``islice`` ends it, only a window ahead was drawn, and
    closing the results stops the drawing."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    drawn = 0

    def endless() -> Iterator[int]:
        nonlocal drawn
        for x in itertools.count():
            drawn += 1
            yield x

    results = pool.map(pool.proxy.square, endless())
    assert drawn == 0  # nothing before the first result is asked for
    assert list(itertools.islice(results, 50)) == [x * x for x in range(50)]
    assert 50 <= drawn <= 50 + 2 * pool.size  # a window ahead, no more
    results.close()  # type: ignore[attr-defined]
    seen = drawn
    with pytest.raises(StopIteration):
        next(results)
    assert drawn == seen
    assert pool.proxy.square(4) == 16


def test_map_in_chunks_draws_no_more_items_ahead_than_were_answered(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    """Chunks grow to thousands of items, but a map of which 50 results are taken
    draws a few hundred at most."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    drawn = itertools.count()
    source = (x for x in itertools.count() if next(drawn) >= 0)
    results = pool.map(pool.proxy.square, source, chunksize="auto")
    assert list(itertools.islice(results, 50)) == [x * x for x in range(50)]
    assert 50 <= next(drawn) <= 10 * 50


def test_map_on_a_closed_pool_raises_once_and_ends() -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    results = pool.map(pool.proxy.square, itertools.count())
    assert next(results) == 0
    pool.close()
    with pytest.raises(pipe_rpc.ClientClosedError):
        next(results)
    with pytest.raises(StopIteration):
        next(results)


def test_map_rejects_what_is_not_a_method_of_its_proxy(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    pool = pipe_rpc.pool(Worker, size=1, start_method="forkserver")
    pools.append(pool)
    with pipe_rpc.spawn(Worker) as other:
        wrongs: list[Callable[[int], int]] = [other.square, Worker().square, abs]
        for wrong in wrongs:
            with pytest.raises(TypeError, match="a method of this pool's proxy"):
                pool.map(wrong, [1])
            with pytest.raises(TypeError, match="a method of this pool's proxy"):
                pool.broadcast(wrong, 1)


# -- broadcast, options per child -----------------------------------------------


@pytest.mark.parametrize("method", THREADED)
def test_broadcast_calls_every_child_in_order(
    method: StartMethod, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=3, start_method=method)
    pools.append(pool)
    assert pool.broadcast(pool.proxy.pid) == pool.pids
    assert pool.broadcast(pool.proxy.square, 7) == [49, 49, 49]
    assert pool.broadcast(pipe_rpc.options(pool.proxy, timeout=5).check, x=3) == [3, 3, 3]


def test_limits_apply_in_every_child(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    limit = 1 << 30
    pool = pipe_rpc.pool(
        Worker,
        size=2,
        limits=pipe_rpc.Limits(memory_bytes=limit),
        start_method="forkserver",
    )
    pools.append(pool)
    assert pool.broadcast(pool.proxy.address_space_limit) == [limit, limit]
    with pytest.raises(MemoryError):
        pool.proxy.allocate(2 * limit)
    assert pool.proxy.allocate(10) == 10


def test_untrusted_applies_to_every_child(pools: list[pipe_rpc.Pool[Worker]]) -> None:
    pool = pipe_rpc.pool(Worker, size=2, untrusted=True, start_method="forkserver")
    pools.append(pool)
    for _ in range(pool.size):  # whichever child answers, its reply is refused
        with pytest.raises((pipe_rpc.SerializationError, pipe_rpc.ProtocolError)):
            pool.proxy.opaque()
    assert pool.proxy.square(5) == 25
    wait_for(lambda: all_ready(pool), "every child to answer again")


# -- futures, asyncio, streams, attributes ------------------------------------------


def test_submit_acall_streams_and_attributes_go_through_the_pool(
    pools: list[pipe_rpc.Pool[Worker]],
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pools.append(pool)
    assert pipe_rpc.submit(pool.proxy.square, 6).result(SETTLE) == 36
    assert list(pool.proxy.count(4)) == [0, 1, 2, 3]
    assert pool.proxy.name.startswith("worker ")

    async def main() -> list[int]:
        twice = await pool.proxy.twice(4)
        squared = await pipe_rpc.acall(pool.proxy.square, 5)
        streamed = [x async for x in pipe_rpc.astream(pool.proxy.count, 3)]
        return [twice, squared, *streamed]

    assert asyncio.run(main()) == [8, 25, 0, 1, 2]
    # An open stream is a call in flight on its child: the next call goes elsewhere.
    stream = pool.proxy.count(2)
    first = next(stream)
    assert first == 0
    busy = set(pool.pids) - {pool.proxy.pid()}
    assert len(busy) == 1
    stream.close()  # type: ignore[attr-defined]
    # Every call was given back: both children are idle, calls from one thread stay put.
    assert len({pool.proxy.pid() for _ in range(5)}) == 1


def test_a_cancelled_future_under_kill_replaces_its_child(
    gate: Path, tmp_path: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    pool = pipe_rpc.pool(Worker, size=2, on_timeout="kill", start_method="forkserver")
    pools.append(pool)
    marker = tmp_path / "held"
    future = pipe_rpc.submit(pool.proxy.hold, str(gate), str(marker))
    wait_for(marker.exists, "the held call to reach its child")
    held = int(marker.read_text())
    assert future.cancel()
    wait_for(lambda: gone(held), "the cancelled call's child to be killed")
    wait_for(lambda: held not in pool.pids and all_ready(pool), "its replacement")


# -- closing ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_close_leaves_no_process_and_no_zombie(method: StartMethod) -> None:
    pool = pipe_rpc.pool(Worker, size=3, max_calls_per_child=2, start_method=method)
    for _ in range(3):
        pool.proxy.pid()  # one child retired and replaced on the way
    pids = set(pool.pids) | set(pool.broadcast(pool.proxy.pid))
    with pool as proxy:
        assert proxy.square(2) == 4
    assert all(gone(pid) for pid in pids)
    pool.close()  # idempotent
    with pytest.raises(pipe_rpc.ClientClosedError):
        pool.proxy.square(2)
    with pytest.raises(pipe_rpc.ClientClosedError), pool:
        pass


def test_close_fails_calls_in_flight(gate: Path, tmp_path: Path) -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    marker = tmp_path / "held"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.proxy.hold(str(gate), str(marker))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(marker.exists, "the held call to reach its child")
    held = int(marker.read_text())
    pool.close(timeout=0.2)
    thread.join(SETTLE)
    assert len(errors) == 1
    assert isinstance(errors[0], pipe_rpc.PipeRPCError)
    assert gone(held)


def test_aclose() -> None:
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver")
    pids = pool.pids

    async def main() -> None:
        async with pool as proxy:
            assert proxy.square(3) == 9
        await pool.aclose()  # idempotent

    asyncio.run(main())
    assert all(gone(pid) for pid in pids)


def test_pool_stats_sum_the_children_retired_ones_included() -> None:
    """Pool.stats() sums every child's counts, those the pool has replaced too."""
    with pipe_rpc.pool(CalcService, size=2, start_method="fork", max_calls_per_child=5) as proxy:
        pool_handle = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]
        for i in range(23):
            assert proxy.add(i, 1) == i + 1
        deadline = time.monotonic() + 15.0
        while pool_handle.stats().restarts < 2:
            assert time.monotonic() < deadline
            proxy.add(0, 0)
        stats = pool_handle.stats()
    assert stats.methods["add"].calls >= 23
    assert stats.starts >= 4
    assert isinstance(stats, pipe_rpc.Stats)


def test_pool_stats_count_a_retired_childs_call_while_it_drains(
    gate: Path, tmp_path: Path, pools: list[pipe_rpc.Pool[Worker]]
) -> None:
    """A child retired with a call in flight is closed once the call is done; until
    then its counts are neither the live children's nor the retired ones'."""
    pool = pipe_rpc.pool(Worker, size=1, start_method="forkserver", max_calls_per_child=1)
    pools.append(pool)
    marker = tmp_path / "held"
    future = pipe_rpc.submit(pool.proxy.hold, str(gate), str(marker))
    try:
        wait_for(marker.exists, "the held call to reach its child")
        assert pool.stats().methods["hold"].in_flight == 1
    finally:
        release(gate)
    assert future.result(SETTLE) == int(marker.read_text())
    # Counted as the future completes (just after ``result()`` may return), and then
    # always: while the child is closed, and after.
    wait_for(lambda: pool.stats().methods["hold"].calls == 1, "the call counted")
    for _ in range(20):
        assert pool.stats().methods["hold"].calls == 1
