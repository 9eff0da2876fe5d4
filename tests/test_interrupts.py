"""Calls that end early: an interrupt at any line, a storm of them, close and restart races.

Contract section 3a: an exception a signal handler raises, wherever it lands in
a calling thread, ends that call alone: no lock stays held, no frame is left
half-read or half-written for the next caller, the next call gets its own
reply, and nothing hangs.

An exception from a signal handler lands as a C call returns or a Python
function starts. ``_interrupt_at`` raises one at exactly such a point, the
n-th one of a call, for every n: a sweep over every place a real signal can
land. The storms then send real ``SIGINT``s.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

import pipe_rpc
from pipe_rpc._connection import Connection
from pipe_rpc._liveness import wait_exitcode
from pipe_rpc._pool_children import Lease, _Worker
from pipe_rpc._stats import snapshot
from tests.calc_service import CalcService
from tests.pool_services import Worker
from tests.services import StartMethod
from tests.test_side_channels import client_of, meet_another_call, wait_until

#: The events at which the interpreter runs a signal handler: a C call returning and a
#: Python function starting (the check at ``RESUME``).
_LANDING = frozenset({"c_return", "call"})
SETTLE = 15.0


class _Landing:
    """A profile hook that raises ``KeyboardInterrupt`` at the ``at``-th landing point."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.fired = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if _not_the_calls(frame):
            return
        if event in _LANDING and not self.fired:
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                raise KeyboardInterrupt


def _not_the_calls(frame: FrameType | None) -> bool:
    """Is this inside the making of a side channel, or a finalizer? Only a thread other
    than the main one makes a side channel, where no signal handler runs: the bare
    descriptors it makes could leak to an exception raised there by other means. An
    object that dies as the call runs (some earlier one's, collected) has its
    finalizer or weak reference callback run there: an interrupt in it is ignored
    with it, no part of the call. The sweep leaves both out."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("_open", "_new") and "_lanes" in code.co_filename:
            return True
        if code.co_name == "__del__" or code.co_filename.endswith(_WEAKREFS):
            return True
        frame = frame.f_back
    return False


#: Where the standard library's weak reference callbacks and finalizers are.
_WEAKREFS = ("/weakref.py", "/_weakrefset.py")


def _interrupt_at(at: int, call: Callable[[], Any]) -> tuple[bool, bool]:
    """Run ``call`` with an interrupt at its ``at``-th landing point.

    Returns (the interrupt fired, the call raised ``KeyboardInterrupt``).
    """
    hook = _Landing(at)
    # No collection meanwhile: a finalizer of an earlier test's object run by it would
    # take the landing points (and the interrupt), which are the call's to take.
    gc.disable()
    sys.setprofile(hook)
    try:
        call()
    except KeyboardInterrupt:
        return hook.fired, True
    finally:
        sys.setprofile(None)
        gc.enable()
    return hook.fired, False


def _landings(call: Callable[[], Any]) -> int:
    """How many landing points one run of ``call`` passes."""
    hook = _Landing(at=-1)
    gc.disable()
    sys.setprofile(hook)
    try:
        call()
    finally:
        sys.setprofile(None)
        gc.enable()
    return hook.seen


def _assert_consistent(core: Connection) -> None:
    """Nothing of an ended call is left behind: no lock held, no call pending."""
    for lock in (core._write_lock, core._read_lock):
        assert lock.acquire(False), "a lock stayed held"
        lock.release()
    assert core.protocol.pending_count == 0
    assert core.in_flight == 0
    assert core.broken is None
    if core.counters is not None:  # a server's: no call of its counted in flight for ever
        counted = snapshot([core.counters]).methods
        assert all(method.in_flight == 0 for method in counted.values()), counted


def _sweep(
    core: Connection,
    call: Callable[[], Any],
    check: Callable[[int], None],
    settled: Callable[[], bool] | None = None,
) -> int:
    """Interrupt ``call`` at each of its landing points in turn; after each, nothing of
    it is left (no lock held, no call in flight) and ``check(n)`` must get its own
    reply. Returns how many points were swept.

    ``settled``: the call goes on in another thread (a submitted one): wait for it to
    be true first, not for the call to have ended by the time the interrupt is raised.
    """
    call()  # first-time work (looking the method up) is not part of every call
    points = _landings(call)
    assert points > 20  # the sweep reaches into the call
    fired = 0
    for at in range(1, points + 1):
        # A call's path varies a little (a spin that finds the reply or not), so the
        # last few points may not be reached on every run.
        fired += _interrupt_at(at, call)[0]
        if settled is not None:
            wait_until(settled, f"the call interrupted at landing {at} to end")
        _assert_consistent(core)  # at once: an ended call leaves nothing for a later one
        check(at)
        _assert_consistent(core)
    assert fired > points * 0.9
    return points


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_interrupt_at_any_landing_point_of_a_lone_call_ends_that_call_alone(
    timeout: float | None,
) -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork", timeout=timeout) as calc:
        core = client_of(pipe_rpc_server(calc))._core
        bounded = pipe_rpc.options(calc, timeout=SETTLE)

        def check(n: int) -> None:
            assert bounded.add(n, 1) == n + 1
            assert bounded.echo(("after", n)) == ("after", n)

        _sweep(core, lambda: calc.add(2, 3), check)


def _raises(call: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="no"):
        call()


@pytest.mark.parametrize("reply", ["a raise", "after the spin"])
def test_an_interrupt_at_any_landing_point_of_a_lone_call_off_the_quick_path_ends_it_alone(
    reply: str,
) -> None:
    """A lone call is read in place, unregistered. A reply that is not a plain return
    value registers it and is handed out as every call's is; a reply that comes after
    the spin is waited for asleep in ``poll``. Every landing point of either path, the
    registering included, ends the call alone."""
    with pipe_rpc.spawn(CalcService, start_method="fork") as calc:
        core = client_of(pipe_rpc_server(calc))._core
        bounded = pipe_rpc.options(calc, timeout=SETTLE)

        def check(n: int) -> None:
            assert bounded.add(n, 1) == n + 1
            assert bounded.echo(("after", n)) == ("after", n)

        if reply == "a raise":
            call: Callable[[], Any] = functools.partial(_raises, lambda: calc.fail("no"))
        else:  # well past the spin window
            call = functools.partial(calc.sleep_then_return, 0.005, "late")
        _sweep(core, call, check)


def test_an_interrupt_at_any_landing_point_of_a_big_call_ends_that_call_alone() -> None:
    """Multi-MiB frames: written in parts, read in place."""
    payload = bytes(range(256)) * (12 << 10)  # 3 MiB
    with pipe_rpc.spawn(CalcService, start_method="fork") as calc:
        core = client_of(pipe_rpc_server(calc))._core
        bounded = pipe_rpc.options(calc, timeout=SETTLE)

        def check(n: int) -> None:
            assert bounded.add(n, 1) == n + 1
            assert bounded.echo(payload) == payload

        points = _sweep(core, lambda: calc.echo(payload), check)
        assert points > 20


def test_an_interrupt_at_any_landing_point_of_a_submitted_call_ends_that_call_alone() -> None:
    """``submit(...).result()``, the future's own completion included (``result()``'s
    thread most often reads the reply and completes the future): the call is handed to
    the connection's thread or abandoned, its future completed once, its outcome
    counted once, and once that thread is done with it nothing of it is left."""
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    with server as calc:
        core = client_of(server)._core
        bounded = pipe_rpc.options(calc, timeout=SETTLE)

        def settled() -> bool:
            # ``in_flight`` is calls started less calls ended: 0 when each outcome that
            # was started is counted once (a lost count leaves 1, a repeated one -1).
            counted = server.stats().methods["add"].in_flight
            assert counted >= 0, "an outcome was counted twice"
            handed = core.pump is not None and core.pump.queue  # the thread may hold a lock
            return core.in_flight == 0 and counted == 0 and not handed

        def check(n: int) -> None:
            assert bounded.add(n, 1) == n + 1
            assert pipe_rpc.submit(bounded.add, n, 2).result(SETTLE) == n + 2

        points = _sweep(core, lambda: pipe_rpc.submit(calc.add, 2, 3).result(), check, settled)
        assert points > 40  # into ``concurrent.futures`` too


def test_an_interrupt_at_any_landing_point_of_a_side_channel_call_ends_that_call_alone() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2)
    with server as calc:
        client = client_of(server)
        core = client._core
        errors: list[BaseException] = []

        def in_a_thread() -> None:  # a thread of its own, so it gets a side channel
            try:
                for _ in range(10):
                    meet_another_call(calc, client)
                    if core.lanes.local.channel is not None:
                        break
                assert core.lanes.local.channel is not None

                def check(n: int) -> None:
                    assert pipe_rpc.options(calc, timeout=SETTLE).add(n, 1) == n + 1

                _sweep(core, lambda: calc.add(2, 3), check)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(SETTLE * 4)
        assert not thread.is_alive()
        assert not errors, errors


class _PackageLanding(_Landing):
    """``_Landing`` counting only the landing points in pipe_rpc's own code (an event
    loop's machinery around it has hundreds, none of the call's)."""

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if f"{os.sep}pipe_rpc{os.sep}" in frame.f_code.co_filename:
            super().__call__(frame, event, arg)


def test_an_interrupt_at_any_landing_point_of_an_acall_leaves_it_counted_once() -> None:
    """An awaited call is counted as it starts and as it ends: wherever an interrupt
    lands in it, the server's stats end with no call of it in flight, and the next
    call gets its own reply."""
    with pipe_rpc.spawn(CalcService, start_method="fork") as calc:
        server = pipe_rpc_server(calc)
        bounded = pipe_rpc.options(calc, timeout=SETTLE)

        def run() -> None:
            asyncio.run(pipe_rpc.acall(calc.add, 2, 3))

        run()
        counting = _PackageLanding(at=-1)
        _interrupt_with(counting, run)
        points = counting.seen
        assert points > 10
        fired = 0
        for at in range(1, points + 1):
            hook = _PackageLanding(at)
            _interrupt_with(hook, run)
            fired += hook.fired
            wait_until(
                lambda: server.stats().methods["add"].in_flight == 0,
                f"the call interrupted at landing {at} to be counted as ended",
            )
            assert bounded.add(at, 1) == at + 1
        # An awaited call's path varies more: the loop may take another turn or not.
        assert fired > points * 0.5


def pipe_rpc_server(proxy: object) -> pipe_rpc.Server[Any]:
    """The server behind a ``spawn`` proxy."""
    server = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]
    assert isinstance(server, pipe_rpc.Server)
    return server


# -- pools ------------------------------------------------------------------------------


def _in_flight(pool: pipe_rpc.Pool[Any]) -> list[int]:
    """Every child's count of calls in flight, in child order."""
    return [slot.worker.in_flight for slot in pool._workers.slots if slot.worker is not None]


def _assert_pool_settles(pool: pipe_rpc.Pool[Worker], n: int) -> None:
    """Every call an interrupt ended gives its child back: each count of calls in flight
    comes back to 0, and every child still answers."""
    wait_until(lambda: not any(_in_flight(pool)), f"the pool's calls to end after landing {n}")
    bounded = pipe_rpc.options(pool.proxy, timeout=SETTLE)
    assert len(set(pool.broadcast(bounded.pid))) == pool.size
    assert bounded.square(n) == n * n
    assert _in_flight(pool) == [0] * pool.size


def _sweep_pool(pool: pipe_rpc.Pool[Worker], call: Callable[[], Any]) -> int:
    """``_sweep`` for a pool: after each landing point, ``_assert_pool_settles``."""
    call()
    points = _landings(call)
    assert points > 8  # the sweep reaches into the call (the pool's own code has a few)
    fired = 0
    for at in range(1, points + 1):
        fired += _interrupt_at(at, call)[0]
        _assert_pool_settles(pool, at)
    # A submitted call's path varies more: its done callback runs as it is added, or
    # not, and a map's waits loop more or less often (under load, a third fewer).
    assert fired > points * 0.5
    return points


class _LaunchLanding(_Landing):
    """``_Landing`` counting only the landing points in ``_pool_children``, where a
    dead child's slot is marked, launched and greeted (a process's start itself, in
    ``multiprocessing``, is left out: hundreds of points, none of the pool's)."""

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if frame.f_code.co_filename.endswith("_pool_children.py"):
            super().__call__(frame, event, arg)


def _whole(pool: pipe_rpc.Pool[Worker]) -> bool:
    """Both children run and answer (none is still starting)."""
    return len(pool.pids) == 2 and len(set(pool.broadcast(pool.proxy.pid))) == 2


def _retire_one(pool: pipe_rpc.Pool[Worker]) -> None:
    """Retire a child and close it here, as a death or recycling would and as the
    next chores would: its slot waits for a replacement, which only the next
    ``chores`` launches (no call is in flight, so no other thread runs them)."""
    workers = pool._workers
    worker = workers.ready_in_order()[0]
    with workers._lock:
        workers._retire(worker)
        workers._drained.remove(worker)
    worker.server.close(1.0)


def test_an_interrupt_at_any_landing_point_of_a_replacements_launch_loses_no_slot() -> None:
    """A waiting slot is marked as launching, taken out of the waiting list and
    launched: wherever an interrupt lands, the slot ends launched or waiting again,
    never marked for ever (``pids`` would wait on it) nor lost (the pool would stay a
    child short)."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver", timeout=SETTLE)
    with pool:
        workers = pool._workers
        _retire_one(pool)
        counting = _LaunchLanding(at=-1)
        _interrupt_with(counting, workers.chores)
        points = counting.seen
        assert points > 5
        fired = 0
        for at in range(1, points + 1):
            wait_until(lambda: _whole(pool), "the pool to be whole")
            _retire_one(pool)
            hook = _LaunchLanding(at)
            _interrupt_with(hook, workers.chores)
            fired += hook.fired
            wait_until(
                lambda: not any(slot.launching for slot in workers.slots) and _whole(pool),
                f"the slot interrupted at landing {at} to be launched again",
            )
        assert fired == points


class _PoolLanding(_Landing):
    """``_Landing`` counting only the landing points in the pool's own code of its
    children (retiring one, giving a call back, the chores) and in the counting of
    their calls (``_LaunchLanding`` says why a process's start is left out; so is a
    server's close)."""

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if frame.f_code.co_filename.endswith(_POOL_FILES):
            super().__call__(frame, event, arg)


#: Where ``_PoolLanding`` lands: the pool's children, and the counting of their calls.
_POOL_FILES = ("_pool_workers.py", "_pool_children.py", "_stats.py")


def _retired_and_closed(pool: pipe_rpc.Pool[Worker], worker: _Worker, calls: int = 0) -> bool:
    """The pool is whole again, ``worker``, retired, is closed and held nowhere, and
    the pool's stats count ``calls`` calls of ``square`` (its children's), no more."""
    workers = pool._workers
    counted = pool.stats().methods.get("square")
    return (
        _whole(pool)
        and (0 if counted is None else counted.calls) == calls
        and worker.server._handle.closed
        and worker not in workers._ready
        and worker not in workers._retiring
        and worker not in workers._drained
        and all(slot.worker is not worker for slot in workers.slots)
    )


def test_an_interrupt_at_any_landing_point_of_retiring_a_dead_child_keeps_it_and_its_slot() -> None:
    """A child killed while idle is retired by the next look for deaths: wherever an
    interrupt lands in that look, its slot gets a new child, the dead one is closed,
    and its calls are in the pool's stats once (before, one landing left it out of
    the ready list but in its slot, never replaced, with the pool a child short for
    good; one in the adding of its counts counted them twice)."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver", timeout=SETTLE)
    with pool:
        workers = pool._workers

        made = [0]  # calls of ``square``, which the pool's stats must count once each

        def kill_one() -> _Worker:
            worker = workers.ready_in_order()[0]
            for n in range(3):
                assert worker.server.proxy.square(n) == n * n
            made[0] += 3
            os.kill(worker.pid, signal.SIGKILL)
            wait_until(worker.server._ended, "the killed child to end")
            return worker

        # Until a run passes no more landing points: there are more of them as the
        # counts of the children retired so far grow.
        dead = kill_one()
        workers.notice_deaths()
        at = 0
        while at < 1000:
            at += 1
            wait_until(
                functools.partial(_retired_and_closed, pool, dead, made[0]),
                f"the child interrupted at landing {at - 1} to be replaced, closed, counted once",
            )
            dead = kill_one()
            hook = _PoolLanding(at)
            _interrupt_with(hook, workers.notice_deaths)
            if not hook.fired:
                break
        assert at > 20
        wait_until(
            functools.partial(_retired_and_closed, pool, dead, made[0]), "the last to be closed"
        )


def test_an_interrupt_at_any_landing_point_of_a_retired_childs_last_give_back_closes_it() -> None:
    """A child retired with a call in flight is closed once that call is given back:
    wherever an interrupt lands in the give-back (the caller's ``except`` gives it
    back again, which does nothing if the first got through), the child is closed
    (before, one landing left it in neither list of retired children, open for good)."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver", timeout=SETTLE)
    with pool:
        workers = pool._workers

        def retire_busy() -> tuple[_Worker, Lease]:
            lease = Lease()
            worker, _ = workers.take(lease, None)
            with workers._lock:
                workers._retire(worker)
            assert worker in workers._retiring
            return worker, lease

        counting = _PoolLanding(at=-1)
        retired, lease = retire_busy()
        _interrupt_with(counting, functools.partial(workers.give_back, lease))
        points = counting.seen
        assert points > 5
        fired = 0
        for at in range(1, points + 1):
            wait_until(
                functools.partial(_retired_and_closed, pool, retired), "the pool to be whole"
            )
            retired, lease = retire_busy()
            hook = _PoolLanding(at)
            _interrupt_with(hook, functools.partial(workers.give_back, lease))
            workers.give_back(lease)  # as the call's ``except`` would
            fired += hook.fired
            wait_until(
                functools.partial(_retired_and_closed, pool, retired),
                f"the child interrupted at landing {at} to be closed",
            )
        assert fired == points


def _interrupt_with(hook: _Landing, call: Callable[[], Any]) -> None:
    gc.disable()
    sys.setprofile(hook)
    try:
        call()
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
        gc.enable()


@pytest.fixture
def worker_pool() -> Iterator[pipe_rpc.Pool[Worker]]:
    """Two children, one call at a time each: a child counted busy for ever is never
    given another call."""
    pool = pipe_rpc.pool(Worker, size=2, start_method="forkserver", timeout=SETTLE)
    with pool:
        yield pool


def test_an_interrupt_at_any_landing_point_of_a_pool_call_gives_its_child_back(
    worker_pool: pipe_rpc.Pool[Worker],
) -> None:
    """The child is taken inside the call's ``try``: wherever the interrupt lands, the
    child is given back, once."""
    pool = worker_pool
    _sweep_pool(pool, lambda: pool.proxy.square(3))
    _sweep_pool(pool, lambda: pool.proxy.name)


def test_an_interrupt_at_any_landing_point_of_a_pool_submit_gives_its_child_back(
    worker_pool: pipe_rpc.Pool[Worker],
) -> None:
    """Between the take and the future's done callback being added (or its running, if
    the future is done by then), and in the future's completion by ``result()``."""
    pool = worker_pool
    _sweep_pool(pool, lambda: pipe_rpc.submit(pool.proxy.square, 3))
    _sweep_pool(pool, lambda: pipe_rpc.submit(pool.proxy.square, 3).result())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_any_landing_point_of_a_pool_stream_gives_its_child_back(
    worker_pool: pipe_rpc.Pool[Worker],
) -> None:
    pool = worker_pool
    _sweep_pool(pool, lambda: list(pool.proxy.count(2)))


def test_an_interrupt_at_any_landing_point_of_a_pool_map_gives_every_child_back(
    worker_pool: pipe_rpc.Pool[Worker],
) -> None:
    """``map`` runs in the consumer's thread: an interrupt landing anywhere in a
    ``next()`` (taking, sending, a future's completion and its done callbacks) leaves no
    child counted busy."""
    pool = worker_pool
    _sweep_pool(pool, lambda: next(pool.map(pool.proxy.square, range(6))))
    _sweep_pool(pool, lambda: list(pool.map(pool.proxy.square, range(6))))


def test_an_interrupt_at_any_landing_point_of_a_chunked_pool_map_gives_every_child_back() -> None:
    """The same with chunks (which a timeout turns off: this pool has none), and each
    chunk's counting callback, which runs before its child is given back."""
    with pipe_rpc.pool(Worker, size=2, start_method="forkserver") as proxy:
        pool = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]
        _sweep_pool(pool, lambda: list(pool.map(pool.proxy.square, range(16), chunksize=8)))
        assert pool.stats().methods["square"].in_flight == 0


# -- real signals -------------------------------------------------------------------


class _Storm:
    """A thread that sends ``SIGINT`` to the main thread every 0-2 ms until stopped."""

    def __init__(self) -> None:
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        main = threading.main_thread().ident
        assert main is not None
        rng = random.Random(7)
        while not self._stop.wait(rng.uniform(0, 0.002)):
            signal.pthread_kill(main, signal.SIGINT)
            self.sent += 1

    def __enter__(self) -> _Storm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SETTLE)


class _Armed:
    """A SIGINT handler that raises ``KeyboardInterrupt`` only while the test is inside a
    call: the test's own loop must not be hit between calls, pipe_rpc anywhere in them."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.armed:
            raise KeyboardInterrupt

    def calls_until(
        self, deadline: float, call: Callable[[int], Any], expected: Callable[[int], Any]
    ) -> tuple[int, int]:
        """Call until ``deadline``, each reply checked; returns (answered, interrupted)."""
        answered = interrupted = 0
        n = 0
        while time.monotonic() < deadline:
            n += 1
            got: Any = _NOTHING
            try:
                self.armed = True
                got = call(n)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                self.armed = False
            if got is not _NOTHING:
                assert got == expected(n)
                answered += 1
        return answered, interrupted


_NOTHING = object()


@pytest.fixture
def armed() -> Iterator[_Armed]:
    handler = _Armed()
    previous = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, previous)


def _calls_until(
    deadline: float, call: Callable[[int], Any], expected: Callable[[int], Any]
) -> tuple[int, int]:
    """Call until ``deadline``, each reply checked (no signal reaches this thread)."""
    answered = 0
    n = 0
    while time.monotonic() < deadline:
        n += 1
        assert call(n) == expected(n)
        answered += 1
    return answered, 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "forkserver"])
@pytest.mark.parametrize("timeout", [None, 10.0])
def test_a_sigint_storm_with_four_calling_threads_hangs_nothing(
    method: StartMethod, timeout: float | None, armed: _Armed
) -> None:
    """Four seconds of SIGINT at the main thread while it and three others call: every
    call that returns has its own reply, the others go on unhurt, nothing hangs."""
    server = pipe_rpc.spawn(CalcService, start_method=method, max_concurrency=4, timeout=timeout)
    with server as calc:
        end = time.monotonic() + 4.0
        results: dict[int, tuple[int, int]] = {}
        errors: list[BaseException] = []

        def worker(tag: int) -> None:
            try:
                results[tag] = _calls_until(
                    end, lambda n: calc.echo((tag, n, b"x" * n)), lambda n: (tag, n, b"x" * n)
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(tag,)) for tag in (1, 2, 3)]
        for thread in threads:
            thread.start()
        with _Storm() as storm:
            answered, interrupted = armed.calls_until(
                end, lambda n: calc.echo((0, n)), lambda n: (0, n)
            )
        for thread in threads:
            thread.join(SETTLE)
        assert not any(thread.is_alive() for thread in threads), "a caller hung"
        assert not errors, errors
        assert storm.sent > 200
        assert interrupted > 50  # the storm reached the calls
        assert answered > 0
        assert all(done > 0 for done, _ in results.values())
        # Afterwards every thread's call is answered, with its own reply.
        bounded = pipe_rpc.options(calc, timeout=SETTLE)
        assert bounded.echo("main") == "main"
        assert [bounded.add(i, 1) for i in range(20)] == list(range(1, 21))
        started = time.monotonic()
    assert time.monotonic() - started < SETTLE  # close() too


def test_an_interrupt_while_a_big_request_is_half_written_leaves_the_pipe_framed() -> None:
    """The child is busy, so a multi-MiB request stops half written; an interrupt ends
    that call, and the next call (rest of the frame first) gets its own reply."""
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=1)
    with server as calc:
        core = client_of(server)._core
        busy = threading.Thread(target=calc.sleep_then_return, args=(1.0, "busy"))
        busy.start()
        wait_until(lambda: core.in_flight > 0, "the busy call")
        previous = signal.signal(signal.SIGALRM, _raise_interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                calc.echo(b"x" * (32 << 20))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert pipe_rpc.options(calc, timeout=8.0).add(1, 2) == 3
        busy.join(SETTLE)
        assert pipe_rpc.options(calc, timeout=8.0).echo("next") == "next"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- close and restart races ----------------------------------------------------------


class Named:
    """A service that says who it is and remembers what it was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[object] = []

    def who(self, value: object) -> tuple[str, object]:
        self.seen.append(value)
        return self.name, value

    def asked(self) -> list[object]:
        return self.seen


class SlowToPickle:
    """An argument whose pickling says it started, then takes a while: a race's window."""

    started = threading.Event()

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        SlowToPickle.started.set()
        time.sleep(1.2)  # longer than close() waits for a reader to finish
        return int, (self.value,)


@pytest.mark.parametrize(
    ("method", "timeout"), [("fork", None), ("forkserver", SETTLE), ("spawn", SETTLE)]
)
def test_a_call_racing_close_never_reaches_the_pipe_that_reuses_its_descriptor(
    method: StartMethod, timeout: float | None
) -> None:
    """A call is pickling its argument when another thread closes its server, and a new
    pipe, served by another service, gets the old descriptor numbers: the call ends with
    ``ClientClosedError``, and the other service never sees it."""
    first = pipe_rpc.spawn(functools.partial(Named, "A"), start_method=method)
    outcome: list[object] = []
    SlowToPickle.started.clear()

    def caller() -> None:
        try:
            outcome.append(pipe_rpc.options(first.proxy, timeout=timeout).who(SlowToPickle(1)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    assert SlowToPickle.started.wait(SETTLE)
    first.close()
    ours, theirs = multiprocessing.Pipe()  # the lowest free numbers: most often A's
    other = Named("B")
    server = threading.Thread(target=pipe_rpc.serve, args=(other, theirs), daemon=True)
    server.start()
    with pipe_rpc.Client[Named](ours, timeout=SETTLE) as client:
        thread.join(SETTLE)
        assert not thread.is_alive()
        assert client.proxy.asked() == [], "the new service ran the closed server's call"
    (got,) = outcome
    assert isinstance(got, pipe_rpc.ClientClosedError), repr(got)
    server.join(SETTLE)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_restart_race_raises_only_pipe_rpc_errors(method: StartMethod) -> None:
    """Eight threads call while the child is killed and replaced, twenty times over:
    every call returns its own value or raises a pipe_rpc error, never a raw one."""
    server = pipe_rpc.spawn(
        CalcService, start_method=method, restart="on-failure", max_concurrency=8
    )
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(tag: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:  # a call that takes a moment, so that the kill finds every thread waiting
                assert server.proxy.sleep_then_return(0.005, (tag, n)) == (tag, n)
            except pipe_rpc.PipeRPCError:
                pass
            except BaseException as exc:
                errors.append(exc)
                return

    with server:
        threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(8)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(20):
                _kill_and_wait_for_restart(server)
        finally:
            stop.set()
            for thread in threads:
                thread.join(SETTLE)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_dead_childs_exit_code_is_still_answered_after_a_restart_closed_its_handle(
    method: StartMethod,
) -> None:
    """A thread still reading a dead child's pipe asks for its exit code after another
    thread's restart closed the process handle: it gets the code, not ``ValueError``."""
    server = pipe_rpc.spawn(CalcService, start_method=method)
    with server:
        child = server._handle.child
        assert child is not None
        os.kill(child.pid, signal.SIGKILL)
        child.stop(graceful=0)  # as a restart does: reaps the child, closes the handle
        assert wait_exitcode(child.process, 0.5) == -signal.SIGKILL
        assert child.process.sentinel == -1
        child.process.join(0.1)  # answers, too


def _kill_and_wait_for_restart(server: pipe_rpc.Server[Any]) -> None:
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.pid != pid, "a restart")


# -- small ones ---------------------------------------------------------------------------


class Keywords:
    def keywords(self, /, **kwargs: Any) -> dict[str, Any]:
        return kwargs


def test_a_keyword_named_self_reaches_the_service() -> None:
    with pipe_rpc.spawn(Keywords, start_method="fork") as proxy:
        assert proxy.keywords(self=1, other=2) == {"self": 1, "other": 2}


@pytest.mark.parametrize("timeout", [float("inf"), 1e7, 1e12])
def test_a_huge_timeout_is_a_long_deadline_not_an_overflow(timeout: float) -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork", timeout=timeout) as calc:
        assert calc.add(1, 2) == 3
        assert pipe_rpc.options(calc, timeout=timeout).add(2, 2) == 4


def _take_all(results: Iterator[int], got: list[object], ended: bool = False) -> None:
    """Each result of ``results`` into ``got``, and each item error (kept as it is: a
    ``str()`` first would be a landing point of its own); ``ended``: an item whose call
    an interrupt ended (raising it) as ``"ended"``."""
    while True:
        try:
            for value in results:
                got.append(value)
            return
        except ValueError as exc:
            got.append(exc)
        except KeyboardInterrupt:
            if not ended:
                raise
            got.append("ended")


def _resumed_map(at: int, make: Callable[[], Iterator[int]]) -> list[object]:
    """Consume ``make()``'s map with an interrupt at landing ``at``, then go on with the
    same iterator: each result or item error in the order taken."""
    results = make()
    got: list[object] = []
    _interrupt_at(at, lambda: _take_all(results, got))
    _take_all(results, got, ended=True)
    return [str(value) if isinstance(value, ValueError) else value for value in got]


@pytest.mark.parametrize(
    ("chunksize", "items"), [(1, [1, -2, 3, 4]), (4, [1, 2, -3, 4, 5, 6, 7, -8, 9, 10, 11, 12])]
)
def test_an_interrupt_at_any_landing_point_of_a_map_drops_no_result_and_repeats_none(
    chunksize: int, items: list[int]
) -> None:
    """After an interrupt, the same iterator goes on where it was: every item's result
    or error comes once, in order, wherever the interrupt landed. The interrupt ends
    one call at most, while it is being sent: its items raise it in their place."""
    expected: list[int | str] = [x if x >= 0 else f"negative: {x}" for x in items]
    ended = 0
    with pipe_rpc.pool(Worker, size=2, start_method="forkserver") as proxy:
        pool: pipe_rpc.Pool[Worker] = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]

        def make() -> Iterator[int]:
            return pool.map(pool.proxy.check, items, chunksize=chunksize)

        points = _landings(lambda: _take_all(make(), []))
        assert points > 50
        for at in range(1, points + 1):
            got = _resumed_map(at, make)
            assert len(got) == len(items), f"landing {at}: {got}"
            lost = [i for i, value in enumerate(got) if value == "ended"]
            assert len(lost) <= max(chunksize, 1), f"landing {at}: {got}"
            if lost:  # one call's items, in a row
                assert lost == list(range(lost[0], lost[0] + len(lost))), f"landing {at}"
                ended += 1
            kept = [value for value in got if value != "ended"]
            assert kept == [v for i, v in enumerate(expected) if i not in lost], f"landing {at}"
            _assert_pool_settles(pool, at)
    assert ended < points / 2  # most landings end no call


def test_an_interrupt_at_any_landing_point_of_a_stream_keeps_its_window_whole() -> None:
    """A stream's frame is counted as taken, and due for credit, in the same locked
    step that takes it: wherever an interrupt lands, every item that came is counted
    or still waits in its frame (a frame lost uncounted would shrink the child's
    window for good, and a few of them would stall the stream)."""
    server = pipe_rpc.spawn(Worker, start_method="forkserver", timeout=SETTLE)
    with server:
        proxy = server.proxy

        def consume(items: Iterator[int]) -> None:
            for _ in items:
                pass

        points = _landings(lambda: consume(proxy.count(600)))  # three frames or more
        assert points > 600
        for at in range(1, points + 1):
            items = proxy.count(600)
            _interrupt_at(at, lambda: consume(items))  # noqa: B023
            consume(items)  # the rest (nothing, if the interrupt closed the stream)
            call = items._call  # type: ignore[attr-defined]
            # Every item that came is counted taken, or still waits in its frame.
            waiting = sum(len(frame) for frame in call.frames)
            assert call.taken + waiting == call.received, f"landing {at}"
        assert proxy.square(3) == 9
