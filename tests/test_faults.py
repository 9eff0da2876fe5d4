"""Faults at every stage of a call, and deaths of the child, under every start method.

The matrix follows CPython's ``Lib/test/test_concurrent_futures/test_deadlock.py``:
objects that raise, exit or segfault while they are pickled or unpickled, at
each stage a call goes through::

    caller pickles the arguments -> child unpickles them -> child runs the method
    -> child pickles the result -> caller unpickles it

Every case must end in the documented error within a bounded time and leave the
server either usable (``add(1, 2) == 3`` on the same child) or clearly dead
(every later call raises ``WorkerDiedError`` at once and ``is_alive()`` is
False). A fatal fault in the caller's own process runs in a subprocess.

The rest covers the child's death from outside and the server's life cycle:
SIGKILL with calls in flight, ``os._exit`` without a reply, fork siblings,
both restart policies, ``close()`` during a call, and leaks over many cycles.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal, cast

import pytest

import pipe_rpc
from tests.services import (
    FAULT_MESSAGE,
    FAULTS,
    OS_EXIT_CODE,
    SYS_EXIT_CODE,
    CallerStage,
    Fault,
    FaultAtPickle,
    FaultAtUnpickle,
    FaultError,
    FaultService,
    QueueWatchingService,
    StartMethod,
    serve_watching_queue,
)

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]
ROOT = Path(__file__).resolve().parent.parent

#: The contract's bound for failing the calls of a dead child: "promptly, well under a second".
PROMPTLY = 1.0
#: A call to a child already known dead must fail "at once": no waiting at all.
AT_ONCE = 0.25
#: A fault that kills nothing is answered within this (it is a plain reply).
BOUNDED = 5.0
#: How long to wait for a condition the test itself brought about (a call starting).
SETTLE = 15.0

pytestmark = [
    # Python 3.12+ warns when fork() runs in a process with threads; the fork
    # cases here choose fork on purpose, and the parent has no threads of its own
    # when they fork (the warning would only be a leftover of another test).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


@pytest.fixture(params=METHODS)
def start_method(request: pytest.FixtureRequest) -> StartMethod:
    return cast(StartMethod, request.param)


@contextlib.contextmanager
def serving(
    start_method: StartMethod,
    *,
    restart: Literal["never", "on-failure"] = "never",
    max_concurrency: int = 1,
) -> Iterator[pipe_rpc.Server[FaultService]]:
    """One child per test; closed with a short grace, since some tests leave it blocked."""
    server = pipe_rpc.spawn(
        FaultService,
        start_method=start_method,
        restart=restart,
        max_concurrency=max_concurrency,
    )
    try:
        yield server
    finally:
        server.close(timeout=1.0)


# -- helpers -----------------------------------------------------------------


def outcome(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """Run ``call``; return what it raised (``None`` if nothing) and how long it took.

    ``SystemExit`` is caught too: some cases must show where it ends up.
    """
    started = time.monotonic()
    try:
        call()
    except (Exception, SystemExit) as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


class Caller(threading.Thread):
    """A thread making one call and keeping its result or error and when it ended."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at = float("inf")

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # where a SystemExit lands is part of what is tested
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = SETTLE) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def death_words(exitcode: int) -> str:
    """What the contract says the message of a ``WorkerDiedError`` names."""
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def assert_worker_died(error: BaseException | None, exitcode: int) -> None:
    assert isinstance(error, pipe_rpc.WorkerDiedError), f"expected WorkerDiedError, got {error!r}"
    assert error.exitcode == exitcode, str(error)
    assert death_words(exitcode) in str(error)


def assert_usable(server: pipe_rpc.Server[FaultService], pid: int | None) -> None:
    """The same child is alive and answers."""
    assert server.is_alive()
    assert server.pid == pid
    assert server.proxy.add(1, 2) == 3
    assert server.proxy.pid() == pid


def assert_dead(server: pipe_rpc.Server[FaultService], exitcode: int) -> None:
    """Every later call raises ``WorkerDiedError`` at once; the child is reaped."""
    for _ in range(3):
        error, elapsed = outcome(lambda: server.proxy.add(1, 2))
        assert_worker_died(error, exitcode)
        assert elapsed < AT_ONCE, f"a call to a dead child took {elapsed:.3f} s"
    assert not server.is_alive()
    assert server.exitcode == exitcode


def assert_died_promptly(
    server: pipe_rpc.Server[FaultService],
    error: BaseException | None,
    elapsed: float,
    exitcode: int,
) -> None:
    assert_worker_died(error, exitcode)
    assert elapsed < PROMPTLY, f"the child's death took {elapsed:.3f} s to fail the call"
    assert_dead(server, exitcode)


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``"Z"`` for a zombie), ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def zombie_children() -> set[int]:
    """Our own children that have ended and were not reaped."""
    me = os.getpid()
    zombies = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if state == "Z" and int(ppid) == me:
            zombies.add(int(entry))
    return zombies


def open_fds() -> dict[int, str]:
    """Our open descriptors and what they point to."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory listing's own descriptor, closed by now
            continue
    return fds


def new_process(
    start_method: StartMethod, target: Callable[[Connection], None], conn: Connection
) -> BaseProcess:
    """A ``Process(target=target, args=(conn,))`` of the given start method, not started."""
    if start_method == "fork":
        return multiprocessing.get_context("fork").Process(target=target, args=(conn,))
    if start_method == "forkserver":
        return multiprocessing.get_context("forkserver").Process(target=target, args=(conn,))
    return multiprocessing.get_context("spawn").Process(target=target, args=(conn,))


# -- the matrix: a fault in the child ----------------------------------------

ChildStage = Literal["argument_unpickling", "method", "result_pickling"]
CHILD_STAGES: tuple[ChildStage, ...] = ("argument_unpickling", "method", "result_pickling")


def call_with_fault_in_child(proxy: FaultService, stage: ChildStage, fault: Fault) -> None:
    if stage == "argument_unpickling":
        proxy.echo(FaultAtUnpickle(fault))
    elif stage == "method":
        proxy.fault(fault)
    else:
        proxy.result_faulting_at_pickle(fault)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", CHILD_STAGES)
def test_fault_in_the_child(start_method: StartMethod, stage: ChildStage, fault: Fault) -> None:
    with serving(start_method) as server:
        pid = server.pid
        error, elapsed = outcome(lambda: call_with_fault_in_child(server.proxy, stage, fault))

        if fault == "segfault":
            assert_died_promptly(server, error, elapsed, -signal.SIGSEGV)
        elif fault == "os_exit":
            assert_died_promptly(server, error, elapsed, OS_EXIT_CODE)
        elif fault == "raise":
            assert elapsed < BOUNDED
            if stage == "method":
                # A remote exception comes back as itself, the remote traceback as its cause.
                assert type(error) is FaultError, repr(error)
                assert error.args == (FAULT_MESSAGE,)
                assert isinstance(error.__cause__, pipe_rpc.RemoteTraceback)
                assert "in trigger" in str(error.__cause__)
            else:
                assert isinstance(error, pipe_rpc.SerializationError), repr(error)
            assert_usable(server, pid)
        elif stage == "method":  # sys.exit() in the method: never ends the caller
            assert isinstance(error, pipe_rpc.PipeRPCError), repr(error)
            assert not isinstance(error, pipe_rpc.ConnectionLostError), repr(error)
            assert "SystemExit" in str(error)
            assert_usable(server, pid)
        elif isinstance(error, pipe_rpc.WorkerDiedError):
            # sys.exit() while (un)pickling in the child: the contract allows the child
            # to end of it, then it must be clearly dead with the code it exited with.
            assert_died_promptly(server, error, elapsed, SYS_EXIT_CODE)
        else:
            # ... or the serialization error it is, the child alive.
            assert isinstance(error, pipe_rpc.SerializationError), repr(error)
            assert elapsed < BOUNDED
            assert_usable(server, pid)

        if server.is_alive():
            # A call whose arguments did not unpickle must not have run.
            assert server.proxy.echo_count() == 0


# -- the matrix: a fault in the caller ---------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["raise", "sys_exit"])
def test_argument_pickling_fault_in_the_caller(start_method: StartMethod, fault: Fault) -> None:
    with serving(start_method) as server:
        pid = server.pid
        error, elapsed = outcome(lambda: server.proxy.echo(FaultAtPickle(fault)))
        assert elapsed < BOUNDED
        if fault == "raise":
            assert isinstance(error, pipe_rpc.SerializationError), repr(error)
        else:
            # The caller's own SystemExit may go on as itself, or count as a failed pickle.
            assert isinstance(error, SystemExit | pipe_rpc.SerializationError), repr(error)
        # Nothing was sent: the connection still works and nothing ran.
        assert_usable(server, pid)
        assert server.proxy.echo_count() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["raise", "sys_exit"])
def test_result_unpickling_fault_in_the_caller(start_method: StartMethod, fault: Fault) -> None:
    with serving(start_method) as server:
        pid = server.pid
        error, elapsed = outcome(lambda: server.proxy.result_faulting_at_unpickle(fault))
        assert elapsed < BOUNDED
        if fault == "raise":
            assert isinstance(error, pipe_rpc.SerializationError), repr(error)
        else:
            assert isinstance(error, SystemExit | pipe_rpc.SerializationError), repr(error)
        assert_usable(server, pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["os_exit", "segfault"])
@pytest.mark.parametrize("stage", ["argument_pickling", "result_unpickling"])
def test_fatal_fault_in_the_callers_own_process(
    start_method: StartMethod, stage: CallerStage, fault: Fault, tmp_path: Path
) -> None:
    """``os._exit`` or a segfault while the caller (un)pickles ends the caller, nothing else.

    That is the test process's own death, so the caller runs in a subprocess:
    it must die of the fault without hanging, and its orphaned child must
    exit on its own within seconds (contract, section 4).
    """
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    code = (
        "from tests.services import caller_fault_main; "
        f"caller_fault_main({stage!r}, {fault!r}, {start_method!r})"
    )
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Files, not pipes: a pipe would also wait for the orphaned grandchild to close it.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        caller = subprocess.Popen(
            [sys.executable, "-c", code], stdout=stdout, stderr=stderr, cwd=ROOT, env=env
        )
        try:
            returncode = caller.wait(timeout=30)
        except subprocess.TimeoutExpired:
            caller.kill()
            caller.wait()
            pytest.fail(f"the caller hung: {out.read_text()} {err.read_text()}")
    text = out.read_text()
    report = f"returncode {returncode}, stdout {text!r}, stderr {err.read_text()[-2000:]!r}"
    assert "survived" not in text, report
    expected = -signal.SIGSEGV if fault == "segfault" else OS_EXIT_CODE
    assert returncode == expected, report
    found = re.match(r"child (\d+)", text)
    assert found is not None, report
    child = int(found.group(1))
    wait_for(
        lambda: process_state(child) in (None, "Z"),
        f"the orphaned child {child} to exit",
        timeout=10.0,
    )


PAD = 16 * 1024


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["raise", "sys_exit"])
def test_result_unpickling_fault_fails_only_its_own_call(
    start_method: StartMethod, fault: Fault, tmp_path: Path
) -> None:
    """Two replies read in one go: a fault decoding one must not reach the other's caller.

    A held call keeps the serial server busy until both requests wait in its
    pipe; it then reads both at once and writes both replies in one write, so
    the caller's reader takes them in one read.
    """
    parent_end, child_end = multiprocessing.Pipe()
    process = new_process(start_method, serve_watching_queue, child_end)
    process.start()
    child_end.close()
    try:
        with pipe_rpc.Client[QueueWatchingService](
            parent_end, process=process, timeout=5.0
        ) as client:
            proxy = client.proxy
            marker = tmp_path / "holding"
            # Both requests carry PAD bytes; wait for a little more than that.
            holder = Caller(lambda: proxy.hold_until_queued(str(marker), 2 * PAD + 32))
            holder.start()
            wait_for(marker.exists, "the server to be held")
            echo = Caller(lambda: proxy.echo(b"e" * PAD))
            echo.start()
            faulty = Caller(lambda: proxy.result_faulting_at_unpickle(fault, b"f" * PAD))
            faulty.start()
            for caller in (holder, echo, faulty):
                caller.join(SETTLE)
                assert not caller.is_alive()

            outcomes = (
                f"held call: {holder.error!r}, echo call: {echo.error!r}, "
                f"faulty call: {faulty.error!r}"
            )
            assert holder.error is None, outcomes
            assert echo.error is None, outcomes
            assert echo.result == b"e" * PAD
            if fault == "raise":
                assert isinstance(faulty.error, pipe_rpc.SerializationError), repr(faulty.error)
            else:
                # Where SystemExit may surface at all, it is in its own caller's thread.
                expected = SystemExit | pipe_rpc.SerializationError
                assert isinstance(faulty.error, expected), repr(faulty.error)
            assert proxy.add(1, 2) == 3
    finally:
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


# -- death of the child ------------------------------------------------------


@pytest.mark.timeout(30)
def test_sigkill_fails_every_call_in_flight_promptly(
    start_method: StartMethod, tmp_path: Path
) -> None:
    with serving(start_method, max_concurrency=4) as server:
        pid = server.pid
        assert pid is not None
        markers = [tmp_path / f"started-{i}" for i in range(4)]
        callers = [Caller(partial(server.proxy.block, str(marker))) for marker in markers]
        for caller in callers:
            caller.start()
        wait_for(lambda: all(m.exists() for m in markers), "four calls running in the child")

        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for caller in callers:
            caller.join(SETTLE)
            assert not caller.is_alive()

        for caller in callers:
            assert_worker_died(caller.error, -signal.SIGKILL)
            took = caller.finished_at - killed_at
            assert took < PROMPTLY, f"a call in flight failed {took:.3f} s after the kill"
        # Each caller gets an error of its own.
        assert len({id(caller.error) for caller in callers}) == 4
        assert_dead(server, -signal.SIGKILL)


@pytest.mark.timeout(30)
def test_os_exit_without_a_reply_is_never_a_success(start_method: StartMethod) -> None:
    with serving(start_method, restart="on-failure") as server:
        for _ in range(3):
            pid = server.pid
            error, elapsed = outcome(lambda: server.proxy.exit_now(0))
            assert_worker_died(error, 0)
            assert elapsed < PROMPTLY
            assert server.proxy.add(1, 2) == 3
            assert server.pid != pid


@pytest.mark.timeout(30)
@pytest.mark.parametrize("victim", [0, 1], ids=["first-forked", "second-forked"])
def test_killing_a_fork_sibling_is_seen_at_once_and_spares_the_other(
    victim: int, tmp_path: Path
) -> None:
    with serving("fork") as first, serving("fork") as second:
        dying, surviving = (first, second) if victim == 0 else (second, first)
        dying_pid, surviving_pid = dying.pid, surviving.pid
        assert dying_pid is not None
        marker = tmp_path / "started"
        caller = Caller(partial(dying.proxy.block, str(marker)))
        caller.start()
        wait_for(marker.exists, "the call to run in the child")

        killed_at = time.monotonic()
        os.kill(dying_pid, signal.SIGKILL)
        caller.join(SETTLE)
        assert not caller.is_alive()
        assert_worker_died(caller.error, -signal.SIGKILL)
        assert caller.finished_at - killed_at < PROMPTLY
        assert_dead(dying, -signal.SIGKILL)

        assert_usable(surviving, surviving_pid)
        surviving.close()
        assert surviving.exitcode == 0, "the survivor did not shut down gracefully"


@pytest.mark.timeout(30)
def test_restart_never_every_call_after_a_death_fails_at_once(start_method: StartMethod) -> None:
    with serving(start_method, restart="never") as server:
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not server.is_alive(), "the child to die")
        # Nothing was in flight: the first call learns of the death, still promptly.
        error, elapsed = outcome(lambda: server.proxy.add(1, 2))
        assert_worker_died(error, -signal.SIGKILL)
        assert elapsed < PROMPTLY
        assert_dead(server, -signal.SIGKILL)
        assert server.pid == pid


@pytest.mark.timeout(30)
def test_restart_on_failure_starts_a_new_child_and_never_retries(
    start_method: StartMethod, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    with serving(start_method, restart="on-failure") as server:
        first_pid = server.pid
        error, elapsed = outcome(lambda: server.proxy.record_and_exit(str(counter), 3))
        assert_worker_died(error, 3)
        assert elapsed < PROMPTLY

        assert server.proxy.add(1, 2) == 3
        second_pid = server.pid
        assert second_pid not in (None, first_pid)
        assert server.proxy.pid() == second_pid
        assert server.is_alive()
        # The method body ran once, in the first child: the failed call was not retried.
        assert counter.read_text().splitlines() == [str(first_pid)]

        # A call in flight when the child is killed from outside raises too.
        assert second_pid is not None
        marker = tmp_path / "started"
        caller = Caller(partial(server.proxy.block, str(marker)))
        caller.start()
        wait_for(marker.exists, "the call to run in the child")
        killed_at = time.monotonic()
        os.kill(second_pid, signal.SIGKILL)
        caller.join(SETTLE)
        assert_worker_died(caller.error, -signal.SIGKILL)
        assert caller.finished_at - killed_at < PROMPTLY
        assert server.proxy.add(1, 2) == 3
        assert server.pid not in (None, first_pid, second_pid)


CLOSE_TIMEOUT = 0.5
#: ``close(t)`` may take t, then SIGTERM's grace, then a SIGKILL and a join; this is generous.
CLOSE_BOUND = CLOSE_TIMEOUT + 2.0


@pytest.mark.timeout(30)
def test_close_with_a_call_in_flight(start_method: StartMethod, tmp_path: Path) -> None:
    server = pipe_rpc.spawn(FaultService, start_method=start_method)
    pid = server.pid
    assert pid is not None
    marker = tmp_path / "started"
    caller = Caller(partial(server.proxy.block, str(marker)))
    caller.start()
    try:
        wait_for(marker.exists, "the call to run in the child")
    except BaseException:
        server.kill()
        raise

    closing_at = time.monotonic()
    server.close(timeout=CLOSE_TIMEOUT)
    closed_in = time.monotonic() - closing_at
    caller.join(SETTLE)

    assert not caller.is_alive()
    assert isinstance(caller.error, pipe_rpc.ClientClosedError | pipe_rpc.WorkerDiedError), repr(
        caller.error
    )
    assert caller.finished_at - closing_at < PROMPTLY
    assert closed_in < CLOSE_BOUND, f"close() took {closed_in:.3f} s"
    # The child is reaped, not a zombie.
    assert server.exitcode is not None
    assert not server.is_alive()
    assert process_state(pid) is None
    # Later calls say the server was closed.
    error, elapsed = outcome(lambda: server.proxy.add(1, 2))
    assert isinstance(error, pipe_rpc.ClientClosedError), repr(error)
    assert elapsed < AT_ONCE
    server.close()  # idempotent


CYCLES = 30


@pytest.mark.timeout(90)
def test_spawn_close_cycles_leave_nothing_behind(start_method: StartMethod) -> None:
    # The first use of a start method may start helpers for good (the forkserver,
    # the resource tracker): warm up before taking the baseline.
    with serving(start_method) as warm:
        assert warm.proxy.add(1, 2) == 3
    gc.collect()  # garbage from earlier tests must not close its descriptors mid-count
    fds_before = open_fds()
    threads_before = threading.active_count()
    zombies_before = zombie_children()
    children_before = {p.pid for p in multiprocessing.active_children()}

    pids = []
    for _ in range(CYCLES):
        server = pipe_rpc.spawn(FaultService, start_method=start_method)
        assert server.proxy.add(1, 2) == 3
        pids.append(server.pid)
        server.close()
        assert server.exitcode == 0, "close() did not shut the idle child down gracefully"

    assert len(set(pids)) == CYCLES
    # Before active_children(), which reaps what it finds.
    assert zombie_children() - zombies_before == set()
    assert {p.pid for p in multiprocessing.active_children()} == children_before
    assert children_before == set(), "children left running by earlier tests"
    assert threading.active_count() == threads_before
    gc.collect()
    fds_after = open_fds()
    leaked = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    assert len(fds_after) == len(fds_before), f"descriptors leaked: {leaked}"
