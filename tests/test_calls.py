"""Calls through real child processes: replies, errors, threads, timeouts, big payloads."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

import pipe_rpc
from pipe_rpc._child import child_main
from pipe_rpc._client import Client
from tests.calc_service import CalcService, ExitingStrError, RefusesToPickleError

METHODS = ["fork", "forkserver", "spawn"]


@pytest.fixture(scope="module", params=METHODS)
def server(request: pytest.FixtureRequest) -> Iterator[pipe_rpc.Server[CalcService]]:
    with_server = pipe_rpc.spawn(CalcService, start_method=request.param, max_concurrency=1)
    try:
        yield with_server
    finally:
        with_server.close()


class CustomInitError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def test_spawn_calls_and_closes(server: pipe_rpc.Server[CalcService]) -> None:
    assert server.proxy.add(1, 2) == 3
    assert server.is_alive()
    assert server.pid != os.getpid()


def test_remote_exception_keeps_type_args_and_traceback(
    server: pipe_rpc.Server[CalcService],
) -> None:
    with pytest.raises(ValueError, match="bad value") as info:
        server.proxy.fail("bad value", 42)
    assert info.value.args == ("bad value", 42)
    cause = info.value.__cause__
    assert isinstance(cause, pipe_rpc.RemoteTraceback)
    assert "calc_service.py" in str(cause)
    assert "in fail" in str(cause)


def test_exception_with_custom_init_arguments_is_rebuilt(
    server: pipe_rpc.Server[CalcService],
) -> None:
    with pytest.raises(Exception, match="7: seven") as info:
        server.proxy.raise_custom(7, "seven")
    assert type(info.value).__name__ == "CustomError"
    assert info.value.code == 7  # type: ignore[attr-defined]


def test_exception_holding_a_lock_becomes_remote_error(
    server: pipe_rpc.Server[CalcService],
) -> None:
    with pytest.raises(pipe_rpc.RemoteError) as info:
        server.proxy.raise_with_lock()
    assert info.value.remote_type == "tests.calc_service.LockedError"
    assert "raise_with_lock" in info.value.remote_traceback
    assert server.proxy.add(1, 1) == 2


def test_chained_exception_shows_both_tracebacks(server: pipe_rpc.Server[CalcService]) -> None:
    with pytest.raises(RuntimeError, match="outer") as info:
        server.proxy.raise_chained()
    text = str(info.value.__cause__)
    assert "KeyError" in text
    assert "direct cause" in text


@pytest.mark.parametrize("exc_name", ["SystemExit", "KeyboardInterrupt"])
def test_remote_system_exit_never_ends_the_caller(
    server: pipe_rpc.Server[CalcService], exc_name: str
) -> None:
    with pytest.raises(pipe_rpc.RemoteError, match=exc_name) as info:
        server.proxy.raise_builtin(exc_name)
    assert info.value.remote_type == f"builtins.{exc_name}"
    assert server.proxy.add(2, 2) == 4


def test_unknown_and_private_methods(server: pipe_rpc.Server[CalcService]) -> None:
    with pytest.raises(pipe_rpc.MethodNotFoundError):
        server.proxy.nope()  # type: ignore[attr-defined]
    assert not hasattr(server.proxy, "_anything")  # answered locally
    for name in ["a.b", "nope"]:
        with pytest.raises(pipe_rpc.MethodNotFoundError):
            getattr(server.proxy, name)()
    assert server.proxy.add(3, 3) == 6


def test_properties_and_attributes_are_read_not_called(
    server: pipe_rpc.Server[CalcService],
) -> None:
    """Reading a public property or data attribute through a proxy fetches its value;
    calling it by name is still ``MethodNotFoundError``; assigning is refused."""
    client = server._handle.child.client  # type: ignore[union-attr]
    for name in ["counter", "prop"]:
        with pytest.raises(pipe_rpc.MethodNotFoundError, match="read it as proxy"):
            client.call(name)
    assert server.proxy.counter == 0  # (reading prop would run its getter, which fails)
    with pytest.raises(AttributeError):
        server.proxy.counter = 5


def test_underscore_names_are_refused_by_the_server_too() -> None:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=pipe_rpc.serve, args=(CalcService(), child))
    process.start()
    child.close()
    with pipe_rpc.Client[CalcService](parent, process=process) as client:
        for name in ["_secret", "__class__", "__init__", "add.__globals__"]:
            with pytest.raises(pipe_rpc.MethodNotFoundError):
                client.call(name)
        assert client.call("secret_was_called") is False
    process.join(5)


def test_unpicklable_argument_raises_before_sending(server: pipe_rpc.Server[CalcService]) -> None:
    with pytest.raises(pipe_rpc.SerializationError):
        server.proxy.echo(threading.Lock())
    assert server.proxy.add(1, 2) == 3


def test_lambda_and_closure_arguments_travel_by_value(
    server: pipe_rpc.Server[CalcService],
) -> None:
    base = 10
    assert server.proxy.apply(lambda x: x + base, 5) == 15


def test_unpicklable_result_is_serialization_error_and_child_lives(
    server: pipe_rpc.Server[CalcService],
) -> None:
    pid = server.pid
    with pytest.raises(pipe_rpc.SerializationError, match="result"):
        server.proxy.make_lock()
    assert server.proxy.add(1, 2) == 3
    assert server.pid == pid


# SystemExit from a __reduce__ already failed only its call; these did not.
BASE_EXCEPTIONS = ["GeneratorExit", "OwnBaseException"]


@pytest.mark.parametrize("kind", BASE_EXCEPTIONS)
def test_a_result_whose_pickling_raises_a_base_exception_fails_only_its_call(
    server: pipe_rpc.Server[CalcService], kind: str
) -> None:
    pid = server.pid
    with pytest.raises(pipe_rpc.SerializationError, match=f"refuses_to_pickle.*{kind}"):
        server.proxy.refuses_to_pickle(kind)
    assert server.proxy.add(1, 2) == 3
    assert server.pid == pid


@pytest.mark.parametrize("kind", BASE_EXCEPTIONS)
def test_an_exception_whose_pickling_raises_a_base_exception_is_rebuilt_from_its_parts(
    server: pipe_rpc.Server[CalcService], kind: str
) -> None:
    pid = server.pid
    with pytest.raises(RefusesToPickleError) as info:
        server.proxy.raise_refusing_to_pickle(kind)
    assert info.value.args == (kind,)
    assert "raise_refusing_to_pickle" in str(info.value.__cause__)
    assert server.proxy.add(1, 2) == 3
    assert server.pid == pid


def test_timeout_and_late_reply_never_reaches_next_call(
    server: pipe_rpc.Server[CalcService],
) -> None:
    quick = pipe_rpc.options(server.proxy, timeout=0.2)
    with pytest.raises(pipe_rpc.CallTimeoutError):
        quick.sleep_then_return(0.5, "late")
    assert isinstance(pipe_rpc.CallTimeoutError("x"), TimeoutError)
    # The late reply arrives while this call waits; it must be dropped.
    assert server.proxy.echo("fresh") == "fresh"


def test_timeout_must_be_positive(server: pipe_rpc.Server[CalcService]) -> None:
    for bad in (0, -1, "1"):
        with pytest.raises(ValueError, match="timeout must be None or > 0"):
            pipe_rpc.options(server.proxy, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        pipe_rpc.spawn(CalcService, timeout=-1)


def test_many_threads_share_one_proxy_and_get_their_own_replies(
    server: pipe_rpc.Server[CalcService],
) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                payload = bytes([n]) * ((i * 997 + n * 13) % 70_000)
                assert server.proxy.echo((n, i, payload)) == (n, i, payload)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in threads)


def _add_from_threads(calc: CalcService, *, threads: int, calls: int) -> list[BaseException]:
    """Run ``calls`` checked add() calls in each of ``threads`` threads; return what they raised."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(calls):
                assert calc.add(n, i) == n + i
        except BaseException as exc:
            errors.append(exc)

    running = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join(30)
    if any(t.is_alive() for t in running):
        errors.append(AssertionError("a thread was still calling after 30 s"))
    return errors


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pipe_rpc-reader"]


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_threads_are_answered_while_another_waits_on_a_slow_call(tmp_path: Path) -> None:
    """The first caller reads for itself; later callers must not wait for its reply."""
    flag = tmp_path / "go"
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2) as calc:
        slow_result: list[bool] = []
        slow = threading.Thread(
            target=lambda: slow_result.append(calc.wait_for_path(str(flag), 30))
        )
        slow.start()
        assert _add_from_threads(calc, threads=3, calls=100) == []
        assert slow.is_alive()  # its call is still blocked on the flag
        assert not slow_result
        flag.touch()
        slow.join(30)
        assert slow_result == [True]
        # Once nothing is pending the reader thread ends, and a lone caller reads again.
        assert _wait_until(lambda: not _reader_threads(), 10), "the reader thread stayed"
        assert calc.add(1, 2) == 3
        assert not _reader_threads()


def test_a_call_still_waiting_when_the_first_caller_leaves_gets_its_reply(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2) as calc:
        results: dict[str, bool] = {}

        def call(name: str, path: Path) -> None:
            results[name] = calc.wait_for_path(str(path), 30)

        reading = threading.Thread(target=call, args=("first", first))
        reading.start()  # alone, so it reads for itself
        assert _wait_until(Path(f"{first}.started").exists, 30)
        waiting = threading.Thread(target=call, args=("second", second))
        waiting.start()  # finds a reader and sleeps
        assert _wait_until(Path(f"{second}.started").exists, 30)
        first.touch()
        reading.join(30)
        assert results == {"first": True}
        second.touch()  # its reply comes after the reader it relied on has left
        waiting.join(30)
        assert results == {"first": True, "second": True}


def test_reader_thread_ends_with_close() -> None:
    calc = pipe_rpc.spawn(CalcService, start_method="fork")
    flag_free = threading.Event()

    def worker() -> None:
        flag_free.wait(10)
        for i in range(50):
            calc.proxy.add(i, i)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    flag_free.set()
    for t in threads:
        t.join(30)
    calc.close()
    assert not _reader_threads()


@pytest.mark.timeout(60)
def test_64_mib_arguments_and_results(server: pipe_rpc.Server[CalcService]) -> None:
    big = os.urandom(1 << 16) * 1024
    assert len(big) == 64 << 20
    assert server.proxy.echo(big) == big
    assert server.proxy.make_bytes(64 << 20)[-5:] == b"\x00" * 5


def test_big_bytes_keep_their_type_both_ways(server: pipe_rpc.Server[CalcService]) -> None:
    big = os.urandom(1 << 10) * 300  # above the size that travels out of band
    for got in (server.proxy.echo(big), server.proxy.echo(value=big)):
        assert type(got) is bytes
        assert got == big
    assert server.proxy.echo([big, big]) == [big, big]


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_an_exception_whose_str_exits_comes_back_and_the_child_lives(
    max_concurrency: int,
) -> None:
    with pipe_rpc.spawn(
        CalcService, start_method="fork", max_concurrency=max_concurrency, timeout=30
    ) as calc:
        with pytest.raises(ExitingStrError):
            calc.raise_exiting_str()
        assert calc.add(1, 2) == 3


def _overwrite(view: memoryview) -> None:
    view[:] = b"\xff" * len(view)


def test_a_big_out_of_band_reply_has_memory_of_its_own(
    server: pipe_rpc.Server[CalcService],
) -> None:
    first = server.proxy.make_buffer(2 << 20, 7)
    second = server.proxy.make_buffer(2 << 20, 9)
    assert bytes(first[:2]) + bytes(second[:2]) == b"\x07\x07\x09\x09"  # not one reused buffer
    first[0] = 1  # writable
    # Private memory: a forked child writing to it changes only its own copy.
    child = multiprocessing.get_context("fork").Process(target=_overwrite, args=(first,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert bytes(first[:3]) == b"\x01\x07\x07"
    assert bytes(second[-2:]) == b"\x09\x09"


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(60)
def test_big_frames_leave_no_buffer_behind() -> None:
    calc = pipe_rpc.spawn(CalcService, start_method="forkserver")
    try:
        big = bytes(64 << 20)
        calc.proxy.echo(b"warm up")
        assert calc.pid is not None
        before = _rss_mib(os.getpid()), _rss_mib(calc.pid)
        for _ in range(2):
            assert calc.proxy.echo(big) == big
            assert len(calc.proxy.make_bytes(64 << 20)) == 64 << 20
        gc.collect()
        after = _rss_mib(os.getpid()), _rss_mib(calc.pid)
    finally:
        calc.close()
    # Keeping a 64 MiB receive buffer for the next big frame would show as +64 MiB.
    assert after[0] - before[0] < 32, (before, after)
    assert after[1] - before[1] < 32, (before, after)


def test_hand_written_setup_with_protocol_client() -> None:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=pipe_rpc.serve, args=(CalcService(), child))
    process.start()
    child.close()
    try:
        with pipe_rpc.Client[CalcService](parent, process=process) as client:
            assert client.proxy.add(1, 2) == 3
            assert client.call("add", 2, b=5) == 7
        process.join(5)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)


def test_calls_after_close_raise_client_closed() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    proxy = server.proxy
    assert proxy.add(1, 1) == 2
    server.close()
    server.close()  # idempotent
    with pytest.raises(pipe_rpc.ClientClosedError):
        proxy.add(1, 1)
    assert server.exitcode == 0


def test_concurrent_calls_run_at_once_with_max_concurrency() -> None:
    # Four calls meet at a barrier in the child: only possible if they run at once.
    results: list[object] = []
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4) as calc:

        def meet() -> None:
            try:
                results.append(calc.rendezvous())
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=meet) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [True] * 4


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_fresh_child_imports_only_what_it_needs(method: Literal["forkserver", "spawn"]) -> None:
    """attrs, cloudpickle, inspect and logging cost milliseconds of every start; the child
    loads the first two only when given limits or a by-value payload, never the others."""
    with pipe_rpc.spawn(CalcService, start_method=method) as calc:
        assert not calc.imported("attrs")
        assert not calc.imported("cloudpickle")
        assert not calc.imported("inspect")
        assert not calc.imported("logging")
    with pipe_rpc.spawn(CalcService, start_method=method, limits=pipe_rpc.Limits()) as calc:
        assert calc.imported("attrs")


def test_startup_error_carries_factory_traceback() -> None:
    with pytest.raises(pipe_rpc.StartupError) as info:
        pipe_rpc.spawn(_failing_factory, start_method="fork")
    assert "factory is broken" in str(info.value)
    assert "_failing_factory" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_startup_failure_is_read_even_if_the_child_ended_before_the_client_spoke() -> None:
    """The child reports its factory's failure and exits; a client that only starts now
    (its hello then meets a closed pipe) still reads the report."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    blob = pickle.dumps(_failing_factory)
    child = ctx.Process(target=child_main, args=(theirs, blob, os.getpid(), None, 1))
    child.start()
    theirs.close()
    child.join(10)
    assert child.exitcode == 1
    client: Client[CalcService] = Client(ours, process=child)
    with pytest.raises(pipe_rpc.StartupError, match="factory is broken"):
        client.wait_ready(10)
    client.close()


def _failing_factory() -> CalcService:
    raise RuntimeError("factory is broken")


def test_threads_share_a_restarting_proxy() -> None:
    # restart="on-failure" checks the child's sentinel before each call, from every thread.
    with pipe_rpc.spawn(CalcService, start_method="fork", restart="on-failure") as calc:
        assert _add_from_threads(calc, threads=4, calls=300) == []


def _closure_factory(base: int) -> Callable[[], Offset]:
    def factory() -> Offset:
        return Offset(base)

    return factory


class Offset:
    def __init__(self, base: int = 0) -> None:
        self.base = base

    def add(self, a: int, b: int) -> int:
        return a + b + self.base


@pytest.mark.parametrize("method", METHODS)
def test_every_kind_of_factory_works_under_every_start_method(method: str) -> None:
    factories: list[tuple[Callable[[], Offset], int]] = [
        (Offset, 0),
        (functools.partial(Offset, 1), 1),
        (lambda: Offset(2), 2),
        (_closure_factory(3), 3),
    ]
    for factory, base in factories:
        with pipe_rpc.spawn(factory, start_method=method) as calc:  # type: ignore[arg-type]
            assert calc.add(1, 2) == 3 + base


def _spin_seconds_in_child(env: dict[str, str], one_cpu: bool = False) -> float:
    """SPIN_SECONDS as a fresh interpreter computes it with ``env`` (on one CPU if asked)."""
    out = subprocess.run(
        [sys.executable, "-c", "import pipe_rpc._transport as t; print(t.SPIN_SECONDS)"],
        env={**os.environ, **env},
        preexec_fn=(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
        if one_cpu
        else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return float(out.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to spin at all")
def test_spin_window_follows_the_environment_and_the_cpus() -> None:
    assert _spin_seconds_in_child({"PIPE_RPC_SPIN_US": "100"}) == pytest.approx(100e-6)
    assert _spin_seconds_in_child({"PIPE_RPC_SPIN_US": "0"}) == 0.0
    assert _spin_seconds_in_child({"PIPE_RPC_SPIN_US": "not a number"}) == pytest.approx(100e-6)
    assert _spin_seconds_in_child({"PIPE_RPC_SPIN_US": "100"}, one_cpu=True) == 0.0


def test_calls_work_with_spinning_off() -> None:
    script = (
        "import pipe_rpc, pipe_rpc._transport as t\n"
        "from tests.calc_service import CalcService\n"
        "assert t.SPIN_SECONDS == 0.0\n"
        "with pipe_rpc.spawn(CalcService, start_method='spawn') as calc:\n"
        "    assert [calc.add(i, 1) for i in range(100)] == list(range(1, 101))\n"
        "    child_spin = calc.apply(lambda _: int(t.SPIN_SECONDS * 1e6), 0)\n"
        "    assert child_spin == 0, child_spin\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PIPE_RPC_SPIN_US": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", METHODS)
def test_a_grandchild_holding_the_pipe_does_not_hide_the_death(method: str, tmp_path: Path) -> None:
    """The child's own forked child keeps the pipe and ``multiprocessing``'s sentinel open."""
    server = pipe_rpc.spawn(CalcService, start_method=method)  # type: ignore[arg-type]
    with server as calc:
        calc.fork_sleeper(30)
        flag = tmp_path / "never"
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                calc.wait_for_path(str(flag), 30)
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=wait)
        caller.start()
        assert _wait_until(Path(f"{flag}.started").exists, 15)
        pid = server.pid
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, 9)  # the child alone, not its process group
        caller.join(15)
        failed_after = time.monotonic() - killed_at
        assert not caller.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], pipe_rpc.WorkerDiedError)
        assert outcome[0].exitcode == -9
        assert failed_after < 1.0
        assert server.exitcode == -9
