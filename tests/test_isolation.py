"""Isolating unsafe code in real child processes: timeouts that kill, limits, orphans, kill().

Every fault prints ``FAULT-TIME <name> <start method> <seconds>``: how long it
took from the faulty call (or the parent's death) to the fault being reported
(or the process being gone). ``pytest -s tests/test_isolation.py | grep FAULT-TIME``.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

import pipe_rpc
from pipe_rpc._child_handle import KILL_GRACE
from pipe_rpc._process import StartMethod
from tests.isolation_services import Victim, resident_bytes

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


# -- helpers -------------------------------------------------------------------


def report(name: str, method: str, seconds: float) -> None:
    """One line per fault for grep: ``FAULT-TIME <name> <method> <seconds>``."""
    print(f"FAULT-TIME {name} {method} {seconds:.3f}")


def wait_for(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Poll ``predicate`` until it holds: the seconds it took, or ``None`` at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _proc_state(pid: int) -> str | None:
    """The state letter in ``/proc/<pid>/stat``, or ``None`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].decode()[:1]


def pid_gone(pid: int) -> bool:
    """The process has ended: no such pid, or a zombie waiting to be reaped by init."""
    if os.path.isdir("/proc/self"):
        return _proc_state(pid) in (None, "Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def wait_pid_gone(pid: int, timeout: float) -> float | None:
    """Wait until ``pid`` has ended (with a pidfd where there is one): seconds taken, or None."""
    start = time.monotonic()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0.0
    except (AttributeError, OSError):
        return wait_for(lambda: pid_gone(pid), timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return None
        return time.monotonic() - start
    finally:
        os.close(pidfd)


def kill_if_alive(pid: int | None) -> None:
    """Clean up after a failed test: SIGKILL a process this test started (by its pid)."""
    if pid is not None and not pid_gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> StartMethod:
    value: StartMethod = request.param
    return value


@pytest.fixture
def killer(method: StartMethod) -> Iterator[pipe_rpc.Server[Victim]]:
    """A service whose calls time out after 0.5 s, which kills and replaces the child."""
    server = pipe_rpc.spawn(
        Victim, start_method=method, timeout=0.5, on_timeout="kill", restart="on-failure"
    )
    try:
        yield server
    finally:
        server.close()


# -- 1-3: timeouts that kill ----------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("limits", [None, pipe_rpc.Limits(open_files=64)])
def test_a_server_dropped_without_close_is_collected_and_its_child_ends(
    limits: pipe_rpc.Limits | None,
) -> None:
    """README: a handle that is garbage-collected is closed."""
    server = pipe_rpc.spawn(Victim, start_method="fork", limits=limits)
    assert server.proxy.ping() == "pong"
    pid = server.pid
    assert pid is not None
    collected = weakref.ref(server)
    del server
    gc.collect()
    assert collected() is None, "something still refers to the server"
    assert wait_for(lambda: pid_gone(pid), 5.0) is not None


@pytest.mark.timeout(30)
def test_runaway_loop_is_killed_on_timeout_and_replaced(
    killer: pipe_rpc.Server[Victim], method: StartMethod
) -> None:
    old = killer.proxy.pid()
    started = time.monotonic()
    with pytest.raises(pipe_rpc.CallTimeoutError, match=r"spin\(\) timed out"):
        killer.proxy.spin()
    elapsed = time.monotonic() - started
    report("runaway-timeout-kill", method, elapsed)
    assert 0.5 <= elapsed < 0.5 + KILL_GRACE + 1.0
    assert wait_pid_gone(old, 5.0) is not None, f"the runaway child {old} is still there"
    assert not killer.is_alive()
    assert killer.exitcode is not None
    assert killer.exitcode < 0
    new = killer.proxy.pid()
    assert new != old
    assert killer.proxy.ping() == "pong"


@pytest.mark.timeout(30)
def test_runaway_that_ignores_sigterm_is_killed_after_the_grace(
    killer: pipe_rpc.Server[Victim], method: StartMethod
) -> None:
    old = killer.proxy.pid()
    started = time.monotonic()
    with pytest.raises(pipe_rpc.CallTimeoutError):
        killer.proxy.spin_ignoring_sigterm()
    gone = wait_pid_gone(old, 5.0)
    elapsed = time.monotonic() - started
    report("sigterm-ignored-kill", method, elapsed)
    assert gone is not None, f"the child {old} that ignores SIGTERM is still there"
    assert elapsed < 0.5 + KILL_GRACE + 1.0
    assert killer.exitcode == -signal.SIGKILL  # SIGTERM did nothing: SIGKILL ended it
    assert killer.proxy.pid() != old


@pytest.mark.timeout(30)
def test_timeout_kill_takes_the_grandchildren_too(
    killer: pipe_rpc.Server[Victim], method: StartMethod
) -> None:
    grandchild = killer.proxy.start_grandchild()
    try:
        assert not pid_gone(grandchild)
        started = time.monotonic()
        with pytest.raises(pipe_rpc.CallTimeoutError):
            killer.proxy.hang(600)
        gone = wait_pid_gone(grandchild, 5.0)
        elapsed = time.monotonic() - started
        report("grandchild-killed", method, elapsed)
        assert gone is not None, f"grandchild {grandchild} (sleep 600) outlived the kill"
        assert elapsed < 0.5 + KILL_GRACE + 1.0
    finally:
        kill_if_alive(grandchild)


# -- 4-7: resource limits ---------------------------------------------------------


_RLIMITS = [resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE]


def _memory_limit(method: StartMethod) -> int:
    """512 MiB of address space; under fork, on top of what the child inherits if that is large."""
    if method != "fork":
        return 512 * MiB
    try:
        with open("/proc/self/status") as f:
            sizes = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")]
    except OSError:
        return 512 * MiB
    inherited = sizes[0] if sizes else 0
    return 512 * MiB if inherited < 256 * MiB else inherited + 512 * MiB


@pytest.mark.timeout(30)
def test_memory_bomb_is_memory_error_and_the_child_lives(method: StartMethod) -> None:
    parent_limits = [resource.getrlimit(r) for r in _RLIMITS]
    limits = pipe_rpc.Limits(memory_bytes=_memory_limit(method))
    with pipe_rpc.spawn(Victim, start_method=method, limits=limits, timeout=20) as victim:
        pid = victim.pid()
        started = time.monotonic()
        with pytest.raises(MemoryError) as info:
            victim.allocate(2 * GiB)
        report("memory-bomb", method, time.monotonic() - started)
        assert type(info.value) is MemoryError
        assert isinstance(info.value.__cause__, pipe_rpc.RemoteTraceback)
        assert "allocate" in str(info.value.__cause__)
        assert victim.ping() == "pong"
        assert victim.pid() == pid
        assert victim.allocate(16 * MiB) == 16 * MiB  # small allocations still work
    assert [resource.getrlimit(r) for r in _RLIMITS] == parent_limits  # the parent is unaffected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_a_failed_call_frees_its_locals_before_the_caller_has_the_error(
    method: StartMethod, max_concurrency: int
) -> None:
    with pipe_rpc.spawn(
        Victim, start_method=method, timeout=20, max_concurrency=max_concurrency
    ) as victim:
        pid = victim.pid()
        before = resident_bytes(pid)
        for _ in range(3):
            with pytest.raises(ValueError, match="failed holding"):
                victim.fail_holding(200 * MiB)
            # Read from here, with no call since: the child is idle, and holds what it holds.
            assert resident_bytes(pid) < before + 64 * MiB
        assert victim.pid() == pid


@pytest.mark.timeout(60)
def test_failed_calls_in_a_row_stay_within_a_memory_limit(method: StartMethod) -> None:
    limits = pipe_rpc.Limits(memory_bytes=_memory_limit(method))
    with pipe_rpc.spawn(Victim, start_method=method, limits=limits, timeout=20) as victim:
        pid = victim.pid()
        for _ in range(5):  # 1000 MiB in all, under a limit of 512 MiB more than at start
            with pytest.raises(ValueError, match="failed holding"):
                victim.fail_holding(200 * MiB)
        assert victim.pid() == pid
        assert victim.ping() == "pong"


@pytest.mark.timeout(30)
def test_memory_exhausted_so_far_that_the_child_cannot_report(method: StartMethod) -> None:
    """Filling the address space to the last bytes: whatever happens, it is reported promptly."""
    limits = pipe_rpc.Limits(memory_bytes=_memory_limit(method))
    server = pipe_rpc.spawn(
        Victim, start_method=method, limits=limits, timeout=20, restart="on-failure"
    )
    try:
        pid = server.proxy.pid()
        started = time.monotonic()
        with pytest.raises(
            (MemoryError, pipe_rpc.WorkerDiedError, pipe_rpc.SerializationError)
        ) as info:
            server.proxy.exhaust_memory()
        report("memory-exhausted", method, time.monotonic() - started)
        if isinstance(info.value, pipe_rpc.WorkerDiedError):
            assert info.value.exitcode is not None
            assert wait_pid_gone(pid, 5.0) is not None
        else:
            server.proxy.release()
        assert server.proxy.ping() == "pong"
        assert bytearray(64 * MiB)  # the parent allocates as before
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_cpu_limit_kills_a_busy_loop_with_a_named_signal_and_hint(method: StartMethod) -> None:
    limits = pipe_rpc.Limits(cpu_seconds=1)
    with pipe_rpc.spawn(Victim, start_method=method, limits=limits) as victim:
        started = time.monotonic()
        with pytest.raises(pipe_rpc.WorkerDiedError) as info:
            victim.spin()
        report("cpu-limit", method, time.monotonic() - started)
    error = info.value
    assert error.exitcode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert error.exitcode is not None
    assert signal.Signals(-error.exitcode).name in str(error)
    assert "cpu_seconds=1" in str(error)
    assert "(probably its cpu_seconds=1 limit)" in str(error) or "possibly" in str(error)


@pytest.mark.timeout(30)
def test_open_files_limit_is_emfile_and_the_child_lives(
    method: StartMethod, tmp_path: Path
) -> None:
    limits = pipe_rpc.Limits(open_files=32)
    with pipe_rpc.spawn(Victim, start_method=method, limits=limits, timeout=20) as victim:
        pid = victim.pid()
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked below
            victim.open_files(str(tmp_path), 100)
        report("open-files", method, time.monotonic() - started)
        assert type(info.value) is OSError
        assert info.value.errno == errno.EMFILE
        assert isinstance(info.value.__cause__, pipe_rpc.RemoteTraceback)
        assert victim.ping() == "pong"
        assert victim.pid() == pid
        if method != "fork":  # a forked child may have inherited all of its 32 descriptors
            assert victim.open_files(str(tmp_path), 5) == 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_bytes": 0}, "memory_bytes"),
        ({"cpu_seconds": -1}, "cpu_seconds"),
        ({"open_files": 1.5}, "open_files"),
        ({"processes": "10"}, "processes"),
        ({"memory_bytes": True}, "memory_bytes"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        pipe_rpc.Limits(**kwargs)  # type: ignore[arg-type]
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_spawn_refuses_limits_that_are_not_limits() -> None:
    with pytest.raises(ValueError, match="limits"):
        pipe_rpc.spawn(Victim, limits="x")  # type: ignore[arg-type]


def test_limits_is_a_frozen_attrs_class() -> None:
    limits = pipe_rpc.Limits(memory_bytes=MiB, cpu_seconds=2, open_files=64, processes=8)
    names = [field.name for field in attrs.fields(pipe_rpc.Limits)]
    assert names == ["memory_bytes", "cpu_seconds", "open_files", "processes"]
    assert pipe_rpc.Limits() == pipe_rpc.Limits(None, None, None, None)
    assert attrs.evolve(limits, cpu_seconds=3).cpu_seconds == 3
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limits.cpu_seconds = 5  # type: ignore[misc]


# -- 8: orphans -------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the orphan parent's output (its stdout is unbuffered: no line is read ahead)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the orphan parent within {timeout} s"
    return proc.stdout.readline().decode().strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_child_exits_when_its_parent_is_killed(method: StartMethod, mode: str) -> None:
    script = str(ROOT / "tests" / "orphan_parent.py")
    child: int | None = None
    with subprocess.Popen(
        [sys.executable, script, method, mode], cwd=ROOT, stdout=subprocess.PIPE, bufsize=0
    ) as parent:
        try:
            first = _read_line(parent, 30)
            assert first.startswith("CHILD "), first
            child = int(first.split()[1])
            expected = {"READY", f"BUSY {child}"} if mode == "busy" else {"READY"}
            lines = {_read_line(parent, 30) for _ in expected}  # READY and BUSY race
            assert lines == expected
            assert not pid_gone(child)
            started = time.monotonic()
            parent.kill()
            parent.wait()
            gone = wait_pid_gone(child, 10.0)
            elapsed = time.monotonic() - started
            report(f"orphan-{mode}", method, elapsed)
            assert gone is not None, f"child {child} outlived its SIGKILLed parent by 10 s"
        finally:
            if parent.poll() is None:
                parent.kill()
            kill_if_alive(child)


# -- 9: kill() and restart() ----------------------------------------------------------


def _call_in_background(
    call: Callable[[], object],
) -> tuple[threading.Thread, list[BaseException | object], list[float]]:
    """Run ``call`` on a thread; its outcome and the time it ended land in the lists."""
    outcome: list[BaseException | object] = []
    ended: list[float] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)
        ended.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome, ended


def _start_blocking_call(
    server: pipe_rpc.Server[Victim], flag: Path
) -> tuple[threading.Thread, list[BaseException | object], list[float]]:
    """A call that sleeps 30 s in the child, started on a thread; returns once it runs."""
    background = _call_in_background(lambda: server.proxy.block(str(flag), 30))
    assert wait_for(flag.exists, 20) is not None, "the blocking call never started"
    return background


@pytest.mark.timeout(30)
def test_kill_fails_the_call_in_flight_with_worker_died(
    method: StartMethod, tmp_path: Path
) -> None:
    server = pipe_rpc.spawn(Victim, start_method=method, restart="on-failure")
    try:
        thread, outcome, ended = _start_blocking_call(server, tmp_path / "running")
        started = time.monotonic()
        server.kill()
        thread.join(10)
        assert not thread.is_alive(), "the call in flight still waits after kill()"
        report("kill-in-flight", method, ended[0] - started)
        assert ended[0] - started < KILL_GRACE + 1.0
        error = outcome[0]
        assert isinstance(error, pipe_rpc.WorkerDiedError), f"got {error!r}"
        assert error.exitcode is not None
        assert error.exitcode < 0
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_kill_then_the_next_call_restarts_and_restart_gives_a_new_child(
    method: StartMethod,
) -> None:
    server = pipe_rpc.spawn(Victim, start_method=method, restart="on-failure")
    try:
        first = server.proxy.pid()
        started = time.monotonic()
        server.kill()
        assert wait_pid_gone(first, 5.0) is not None
        report("kill", method, time.monotonic() - started)
        assert not server.is_alive()
        assert server.exitcode is not None
        assert server.exitcode < 0
        second = server.proxy.pid()
        assert second != first
        assert server.pid == second
        server.restart()
        third = server.proxy.pid()
        assert third not in (first, second)
        assert wait_pid_gone(second, 5.0) is not None
        assert server.proxy.ping() == "pong"
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_kill_with_restart_never_fails_later_calls(method: StartMethod) -> None:
    server = pipe_rpc.spawn(Victim, start_method=method)
    try:
        server.kill()
        with pytest.raises(pipe_rpc.WorkerDiedError) as info:
            server.proxy.ping()
        assert info.value.exitcode is not None
        assert info.value.exitcode < 0
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_restart_fails_the_call_in_flight_with_worker_died(
    method: StartMethod, tmp_path: Path
) -> None:
    """README: restart() replaces the child; calls in flight on the old one get WorkerDiedError."""
    server = pipe_rpc.spawn(Victim, start_method=method)
    try:
        old = server.proxy.pid()
        thread, outcome, ended = _start_blocking_call(server, tmp_path / "running")
        started = time.monotonic()
        server.restart()
        thread.join(10)
        assert not thread.is_alive(), "the call in flight still waits after restart()"
        report("restart-in-flight", method, ended[0] - started)
        assert server.proxy.pid() != old
        error = outcome[0]
        assert isinstance(error, pipe_rpc.WorkerDiedError), f"got {error!r}"
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_timeout_kill_fails_the_other_calls_in_flight_with_worker_died(
    method: StartMethod, tmp_path: Path
) -> None:
    """README: with on_timeout="kill", other calls in flight get WorkerDiedError."""
    server = pipe_rpc.spawn(
        Victim, start_method=method, max_concurrency=2, on_timeout="kill", restart="on-failure"
    )
    try:
        thread, outcome, _ = _start_blocking_call(server, tmp_path / "running")
        with pytest.raises(pipe_rpc.CallTimeoutError):
            pipe_rpc.options(server.proxy, timeout=0.5).hang(600)
        thread.join(10)
        assert not thread.is_alive(), "the other call still waits after the timeout-kill"
        error = outcome[0]
        assert isinstance(error, pipe_rpc.WorkerDiedError), f"got {error!r}"
        assert server.proxy.ping() == "pong"
    finally:
        server.close()


# -- 11: the sandbox example ------------------------------------------------------------


@pytest.mark.timeout(90)
def test_sandbox_example_runs() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sandbox.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(f"examples/sandbox.py ran in {time.monotonic() - started:.2f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in [
        "memory bomb: MemoryError",
        "runaway loop: CallTimeoutError",
        "replaced by child",
        "cpu hog: WorkerDiedError",
        "SIGXCPU",
        "crash: WorkerDiedError",
        "killed by SIGSEGV",
        "sandbox: all faults contained",
    ]:
        assert expected in out, f"{expected!r} missing from:\n{out}"
