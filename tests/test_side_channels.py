"""Side channels: threads that call at the same time each get a socket of their own.

Each test first brings some threads to have side channels (``Workers.channels``),
checks that they did, and then exercises them for real: replies reach their own
callers, a child's death or ``close()`` wakes every thread sleeping on one, a
timeout keeps the channel usable, and a server that cannot take descriptors
still serves every thread over the pipe. The same threads run every step, since
a side channel belongs to its thread.
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import multiprocessing
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import pytest

import pipe_rpc
from pipe_rpc._client import Client
from pipe_rpc._messages import Channel, OpenChannel
from pipe_rpc._pending import PendingCall
from pipe_rpc._protocol import MAX_CHANNELS
from tests.calc_service import CalcService, CustomError
from tests.services import StartMethod

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]
#: The contract's bound for failing the calls of a dead child.
PROMPTLY = 1.0
#: How long to wait for something the test brought about.
SETTLE = 15.0

R = TypeVar("R")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


class Workers:
    """Long-lived threads that run what they are given, each keeping its side channel."""

    def __init__(self, count: int) -> None:
        self.inboxes: list[queue.Queue[Callable[[], Any] | None]] = []
        self.outboxes: list[queue.Queue[tuple[bool, Any, float]]] = []
        self.threads: list[threading.Thread] = []
        for _ in range(count):
            inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
            outbox: queue.Queue[tuple[bool, Any, float]] = queue.Queue()
            thread = threading.Thread(target=self._run, args=(inbox, outbox), daemon=True)
            thread.start()
            self.inboxes.append(inbox)
            self.outboxes.append(outbox)
            self.threads.append(thread)

    @staticmethod
    def _run(
        inbox: queue.Queue[Callable[[], Any] | None], outbox: queue.Queue[tuple[bool, Any, float]]
    ) -> None:
        while (job := inbox.get()) is not None:
            try:
                outbox.put((True, job(), time.monotonic()))
            except BaseException as exc:
                outbox.put((False, exc, time.monotonic()))

    def submit(self, job: Callable[[int], Any]) -> None:
        """Give worker ``n`` the job ``job(n)``, for every worker at once."""
        for n, inbox in enumerate(self.inboxes):
            inbox.put(lambda n=n: job(n))  # type: ignore[misc]

    def results(self, timeout: float = SETTLE) -> list[tuple[bool, Any, float]]:
        """Each worker's outcome: (returned, value or exception, when it finished)."""
        return [outbox.get(timeout=timeout) for outbox in self.outboxes]

    def run(self, job: Callable[[int], R]) -> list[R]:
        """``job(n)`` in every worker; its results, or the first exception raised."""
        self.submit(job)
        outcomes = self.results()
        for ok, value, _ in outcomes:
            if not ok:
                raise value
        return [value for _, value, _ in outcomes]

    def channels(self, calc: CalcService, client: Client[Any], serial: bool = False) -> int:
        """Call from all workers at once until each has a side channel; how many there are.

        Every worker but a lone first reader finds the others' calls in flight,
        and asks for a side channel on its next call. The calls meet in the child
        (all run at once), or with ``serial`` queue behind each other.
        """
        count = len(self.threads)
        deadline = time.monotonic() + SETTLE
        idle = 0  # rounds in a row that opened no channel: eight end it
        while idle < 8 and time.monotonic() < deadline:
            before = len(client._core.lanes)
            if serial:
                assert self.run(lambda n: calc.sleep_then_return(0.02, n)) == list(range(count))
            else:
                assert self.run(lambda n: calc.meet(count)) == [True] * count
            if len(client._core.lanes) >= min(count, MAX_CHANNELS):
                break
            idle = 0 if len(client._core.lanes) > before else idle + 1
        return len(client._core.lanes)

    def stop(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for thread in self.threads:
            thread.join(SETTLE)


def client_of(server: pipe_rpc.Server[Any]) -> Client[Any]:
    child = server._handle.child
    assert child is not None
    return child.client


@pytest.fixture
def workers() -> Iterator[Workers]:
    crew = Workers(4)
    yield crew
    crew.stop()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


#: The number of the ``read`` system call, as ``/proc/<pid>/task/<tid>/syscall`` shows it.
_READ = {"x86_64": 0, "aarch64": 63}.get(os.uname().machine)


def blocked_reading(thread: threading.Thread) -> int | None:
    """The descriptor ``thread`` sleeps in ``read`` on, or ``None``."""
    assert _READ is not None, f"the read system call's number on {os.uname().machine}"
    fields = Path(f"/proc/self/task/{thread.native_id}/syscall").read_text().split()
    if len(fields) < 2 or fields[0] != str(_READ):
        return None
    return int(fields[1], 16)


def asleep_on_doorbells(client: Client[Any], threads: list[threading.Thread]) -> bool:
    """Does every thread sleep on one of the client's doorbells?"""
    doorbells = {channel.doorbell for channel in client._core.lanes} - {-1}
    return all(blocked_reading(thread) in doorbells for thread in threads)


@pytest.mark.parametrize("method", METHODS)
def test_threads_that_call_together_get_side_channels_and_their_own_replies(
    method: StartMethod, workers: Workers
) -> None:
    server = pipe_rpc.spawn(CalcService, start_method=method, max_concurrency=4)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4
        assert calc.side_channels() == 4

        def echo_many(n: int) -> bool:
            for i in range(100):
                size = (1 << 20) + n if i % 25 == 0 else (i * 997 + n * 13) % 70_000
                payload = bytes([n]) * size
                assert calc.echo((n, i, payload)) == (n, i, payload)
                assert calc.add(n, i) == n + i
            return True

        assert workers.run(echo_many) == [True] * 4
        assert len(client_of(server)._core.lanes) == 4  # the same channels all along


def test_every_outcome_on_a_side_channel_reaches_its_own_thread(workers: Workers) -> None:
    """A plain return is read the short way; raises, failures and big replies are matched
    as on the pipe, and the channel goes on serving its thread."""
    server = pipe_rpc.spawn(CalcService, max_concurrency=4)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4

        def outcomes(n: int) -> list[str]:
            seen = []
            for i in range(20):
                try:
                    if i % 4 == 0:
                        calc.raise_custom(n, f"call {i}")
                    elif i % 4 == 1:
                        calc.make_lock()
                    elif i % 4 == 2:
                        calc.no_such_method()  # type: ignore[attr-defined]
                    else:
                        assert calc.make_bytes((1 << 20) + n) == bytes((1 << 20) + n)
                        seen.append("bytes")
                except CustomError as exc:
                    seen.append("raised" if (exc.code, exc.detail) == (n, f"call {i}") else "mixed")
                except pipe_rpc.SerializationError:
                    seen.append("unpicklable")
                except pipe_rpc.MethodNotFoundError:
                    seen.append("not found")
                assert calc.add(n, i) == n + i
            return seen

        expected = ["raised", "unpicklable", "not found", "bytes"] * 5
        assert workers.run(outcomes) == [expected] * 4
        assert len(client_of(server)._core.lanes) == 4  # the same channels all along
        assert calc.side_channels() == 4


def test_threads_share_the_pipe_when_the_server_cannot_take_descriptors(
    workers: Workers,
) -> None:
    limits = pipe_rpc.Limits(open_files=64)
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4, limits=limits)
    with server as calc:
        assert calc.use_every_descriptor() > 0  # now no descriptor can be received
        client = client_of(server)
        assert workers.channels(calc, client) == 0
        assert not client._core.lanes.ok  # refused once, never asked again
        assert workers.run(lambda n: [calc.add(n, i) for i in range(200)]) == [
            [n + i for i in range(200)] for n in range(4)
        ]
        assert calc.side_channels() == 0


def test_side_channels_leave_most_of_a_small_open_file_limit_to_the_service() -> None:
    """Under ``Limits(open_files=48)`` the child's side channels take 12 descriptors, a
    quarter of the limit (6 channels, each a socket and a doorbell), and it refuses the
    rest, which keep sharing the pipe."""
    crew = Workers(24)
    expected = 12 // 2 if hasattr(os, "eventfd") else 12
    try:
        limits = pipe_rpc.Limits(open_files=48)
        server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=24, limits=limits)
        with server as calc:
            client = client_of(server)
            assert crew.channels(calc, client) == expected
            assert all(channel.doorbell >= 0 for channel in client._core.lanes) == (expected == 6)
            assert calc.side_channels() == expected
            assert not client._core.lanes.ok  # refused once, never asked again
            assert crew.run(lambda n: [calc.add(n, i) for i in range(20)]) == [
                [n + i for i in range(20)] for n in range(24)
            ]
    finally:
        crew.stop()


def test_more_threads_than_side_channels_share_the_pipe() -> None:
    crew = Workers(MAX_CHANNELS + 4)
    try:
        server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=MAX_CHANNELS + 4)
        with server as calc:
            assert crew.channels(calc, client_of(server)) == MAX_CHANNELS
            assert crew.run(lambda n: [calc.add(n, i) for i in range(50)]) == [
                [n + i for i in range(50)] for n in range(MAX_CHANNELS + 4)
            ]
            assert calc.side_channels() == MAX_CHANNELS
    finally:
        crew.stop()


def kill_while_all_wait(
    server: pipe_rpc.Server[CalcService], workers: Workers, tmp_path: Path
) -> None:
    """SIGKILL the child (alone) while every worker waits on its side channel; check each
    worker got ``WorkerDiedError`` promptly."""
    calc = server.proxy
    flags = [tmp_path / f"never-{n}" for n in range(4)]
    workers.submit(lambda n: calc.wait_for_path(str(flags[n]), 30))
    wait_until(lambda: all(Path(f"{f}.started").exists() for f in flags), "four calls")
    client = client_of(server)
    wait_until(lambda: asleep_on_doorbells(client, workers.threads), "sleep on the doorbells")
    pid = server.pid
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for ok, error, finished_at in workers.results():
        assert not ok
        assert isinstance(error, pipe_rpc.WorkerDiedError), error
        assert error.exitcode == -signal.SIGKILL
        assert finished_at - killed_at < PROMPTLY


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_wakes_every_thread_waiting_on_a_side_channel(
    method: StartMethod, workers: Workers, tmp_path: Path
) -> None:
    server = pipe_rpc.spawn(CalcService, start_method=method, max_concurrency=4)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4
        kill_while_all_wait(server, workers, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_a_grandchild_holding_the_side_channels_does_not_hide_the_death(
    method: StartMethod, workers: Workers, tmp_path: Path
) -> None:
    """The child's own child keeps its ends of every socket open; its death still counts."""
    server = pipe_rpc.spawn(CalcService, start_method=method, max_concurrency=4)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4
        calc.fork_sleeper(30)  # holds the child's ends of the pipe and of every side channel
        kill_while_all_wait(server, workers, tmp_path)
    # close() killed the grandchild with the child's process group.


def test_close_wakes_every_thread_waiting_on_a_side_channel(
    workers: Workers, tmp_path: Path
) -> None:
    calc = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4)
    try:
        assert workers.channels(calc.proxy, client_of(calc)) == 4
        flags = [tmp_path / f"never-{n}" for n in range(4)]
        workers.submit(lambda n: calc.proxy.wait_for_path(str(flags[n]), 30))
        wait_until(lambda: all(Path(f"{f}.started").exists() for f in flags), "four calls")
        client = client_of(calc)
        wait_until(lambda: asleep_on_doorbells(client, workers.threads), "sleep on the doorbells")
        closed_at = time.monotonic()
        closer = threading.Thread(target=calc.close)
        closer.start()
        for ok, error, finished_at in workers.results():
            assert not ok
            assert isinstance(error, pipe_rpc.ClientClosedError), error
            assert finished_at - closed_at < PROMPTLY
        closer.join(SETTLE)
        workers.submit(lambda n: calc.proxy.add(1, 2))
        for ok, error, _ in workers.results():
            assert not ok
            assert isinstance(error, pipe_rpc.ClientClosedError), error
    finally:
        calc.close()


def test_a_timeout_on_a_side_channel_drops_it_and_its_late_reply_blocks_nobody(
    workers: Workers, tmp_path: Path
) -> None:
    """Nobody would read a timed-out call's reply on its side channel, so the channel goes:
    the child's write of the late reply fails at once instead of blocking the child."""
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    with server as calc:
        client = client_of(server)
        assert workers.channels(calc, client, serial=True) == 4
        quick = pipe_rpc.options(calc, timeout=0.1)
        huge = 64 << 20  # a late reply far larger than the socket buffers

        def time_out(n: int) -> str:
            try:
                quick.sleep_then_return(0.3, b"x" * huge if n == 0 else n)
            except pipe_rpc.CallTimeoutError:
                return "timed out"
            return "answered"

        assert workers.run(time_out) == ["timed out"] * 4
        assert len(client._core.lanes) == 0
        # The child sends four late replies to closed channels, then answers the next calls
        # (on the pipe, until the threads contend again and get new channels).
        patient = pipe_rpc.options(calc, timeout=10)
        assert workers.run(lambda n: [patient.add(n, 1), calc.add(n, 2)]) == [
            [n + 1, n + 2] for n in range(4)
        ]
        assert client.broken is None
        assert workers.channels(calc, client, serial=True) == 4
        wait_until(lambda: calc.side_channels() == 4, "the child to drop the closed channels")


def test_a_thread_that_ends_gives_its_side_channel_back(workers: Workers) -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4
        workers.stop()
        gc.collect()
        wait_until(lambda: calc.side_channels() == 0, "the server to drop the side channels")
        assert len(client_of(server)._core.lanes) == 0
        assert calc.add(1, 2) == 3


def test_a_forked_child_closes_the_side_channels_it_inherits(workers: Workers) -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4)
    with server as calc:
        client = client_of(server)
        assert workers.channels(calc, client) == 4
        ours = {os.fstat(channel.fd).st_ino for channel in client._core.lanes}
        other_server = pipe_rpc.spawn(CalcService, start_method="fork")
        with other_server as other:
            assert other.add(1, 2) == 3
            assert not ours & other.socket_inodes()
            assert other.eventfds() == 0  # nor the doorbells
        assert calc.side_channels() == 4


def test_a_side_channel_locked_at_a_fork_still_closes_in_the_child(workers: Workers) -> None:
    """A fork while a thread holds a channel's lock (as ``wake()`` does): the child's copy
    of the lock would stay held for ever, and closing the channel there would hang."""
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4)
    with server as calc:
        client = client_of(server)
        assert workers.channels(calc, client) == 4
        channel = next(iter(client._core.lanes))
        with channel.lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                code = 1
                try:
                    channel.close()
                    code = 0 if channel.fd == channel.doorbell == -1 else 2
                finally:
                    os._exit(code)
        deadline = time.monotonic() + SETTLE
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("closing the channel hung in the child")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status[1]) == 0
        assert workers.run(lambda n: calc.add(n, 1)) == [1, 2, 3, 4]


def test_an_untrusted_child_serves_side_channels(workers: Workers) -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4, untrusted=True)
    with server as calc:
        assert workers.channels(calc, client_of(server)) == 4
        assert workers.run(lambda n: [calc.echo((n, i, "x" * i)) for i in range(50)]) == [
            [(n, i, "x" * i) for i in range(50)] for n in range(4)
        ]


@pytest.mark.parametrize("watched", [True, False])
def test_a_hand_written_setup_gets_side_channels(workers: Workers, watched: bool) -> None:
    """With the server's process given, side channels have doorbells; without it, they
    have none (nothing would ring one if the server died)."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=pipe_rpc.serve, args=(CalcService(), child), kwargs={"max_concurrency": 4}
    )
    process.start()
    child.close()
    try:
        with pipe_rpc.Client[CalcService](parent, process=process if watched else None) as client:
            calc = client.proxy
            assert workers.channels(calc, client) == 4
            assert {channel.doorbell >= 0 for channel in client._core.lanes} == {watched}
            assert workers.run(lambda n: [calc.add(n, i) for i in range(100)]) == [
                [n + i for i in range(100)] for n in range(4)
            ]
        process.join(SETTLE)
        assert process.exitcode == 0
    finally:
        if process.exitcode is None:
            process.kill()
            process.join()


def test_a_request_cut_short_by_its_timeout_drops_only_its_side_channel(
    workers: Workers, tmp_path: Path
) -> None:
    """Half a frame on a side channel: that channel goes, the client and the pipe stay."""
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    with server as calc:
        client = client_of(server)
        assert workers.channels(calc, client, serial=True) == 4
        flag = tmp_path / "go"
        # One worker keeps the child busy, so nothing reads the others' side channels.
        workers.inboxes[0].put(lambda: calc.wait_for_path(str(flag), 30))
        wait_until(Path(f"{flag}.started").exists, "the child to be busy")
        huge = b"x" * (256 << 20)  # far more than the socket buffers hold
        quick = pipe_rpc.options(calc, timeout=0.3)
        workers.inboxes[1].put(lambda: quick.echo(huge))
        ok, error, _ = workers.outboxes[1].get(timeout=SETTLE)
        assert not ok
        assert isinstance(error, pipe_rpc.CallTimeoutError), error
        assert len(client._core.lanes) == 3
        assert client.broken is None
        flag.touch()
        assert workers.outboxes[0].get(timeout=SETTLE)[:2] == (True, True)
        # The worker whose channel went asks for a new one, and every call is answered.
        assert workers.run(lambda n: [calc.add(n, 1) for _ in range(3)]) == [
            [n + 1] * 3 for n in range(4)
        ]
        wait_until(lambda: calc.side_channels() == len(client._core.lanes), "the child to drop it")


def in_call(client: Client[Any]) -> bool:
    """Is a call in progress?"""
    return bool(client._core.in_flight)


def meet_another_call(calc: CalcService, client: Client[Any]) -> None:
    """Call while another thread's call is in flight (most often: this thread then asks
    for a side channel on its next call)."""
    other = threading.Thread(target=calc.sleep_then_return, args=(0.2, 0))
    other.start()
    wait_until(lambda: in_call(client), "the other call")
    assert calc.add(1, 1) == 2
    other.join()


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_the_main_thread_stays_on_the_pipe_and_an_interrupt_there_ends_its_call_alone() -> None:
    """Signal handlers run in the main thread, so it never gets a side channel however
    often it meets other calls; a signal handler that raises while it waits ends that
    call, and the next calls are answered rightly."""
    server = pipe_rpc.spawn(CalcService, max_concurrency=2)
    with server as calc:
        client = client_of(server)
        for _ in range(5):
            meet_another_call(calc, client)
            assert calc.add(1, 2) == 3
        assert client._core.lanes.local.contended
        assert client._core.lanes.local.channel is None
        previous = signal.signal(signal.SIGALRM, _interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_Interrupted):
                calc.sleep_then_return(1.0, "late")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert [calc.add(2, i) for i in range(5)] == [2, 3, 4, 5, 6]
        assert calc.sleep_then_return(0.0, "next") == "next"
        assert client._core.lanes.local.channel is None


def test_a_descriptor_after_a_big_frame_is_kept() -> None:
    """While the server waits for a descriptor, a big frame read in place comes first."""
    from pipe_rpc._transport import Transport

    ours, theirs = socket.socketpair()
    with ours, theirs:
        transport = Transport(theirs)
        transport.fds = []
        spare_r, spare_w = os.pipe()
        try:
            big = b"b" * (2 << 20)

            def send() -> None:
                ours.sendall(struct.pack("!i", len(big)) + big)
                ours.sendmsg(
                    [struct.pack("!i", 5) + b"small"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [spare_r]))],
                )

            sender = threading.Thread(target=send)
            sender.start()
            bodies: list[bytes] = []
            deadline = time.monotonic() + SETTLE
            while len(bodies) < 2 and time.monotonic() < deadline:
                transport.read(1.0)
                bodies += [bytes(body) for body in transport.take()]
            sender.join(SETTLE)
            assert [len(body) for body in bodies] == [len(big), 5]
            assert len(transport.fds) == 1
            os.close(transport.fds[0])
        finally:
            os.close(spare_r)
            os.close(spare_w)


def _serve_then_stay(conn: Connection, ended: str) -> None:
    """Serve until the loop ends, say so, then stay alive (until killed)."""
    try:
        pipe_rpc.serve(CalcService(), conn)
    except pipe_rpc.ProtocolError:
        pass
    Path(ended).touch()
    time.sleep(SETTLE * 4)


@pytest.mark.parametrize("grandchild", [False, True])
def test_a_loop_that_ends_wakes_a_caller_on_its_doorbell(tmp_path: Path, grandchild: bool) -> None:
    """The server loop ends (a garbage frame on the pipe) while a call waits, unread, on a
    side channel, and the process lives on: closing the channel rings its doorbell, and
    the caller learns the connection is lost. So it does when a process the service forked
    holds the channel's socket too (the loop shuts the socket down)."""
    parent, child = multiprocessing.Pipe()
    ended = tmp_path / "ended"
    process = multiprocessing.get_context("fork").Process(
        target=_serve_then_stay, args=(child, str(ended))
    )
    process.start()
    child.close()
    crew = Workers(2)
    holder: int | None = None  # the grandchild
    try:
        client = pipe_rpc.Client[CalcService](parent, process=process)
        calc = client.proxy
        assert crew.channels(calc, client, serial=True) == 2
        if grandchild:
            holder = calc.fork_sleeper(SETTLE * 4)
        flag = tmp_path / "go"
        crew.inboxes[0].put(lambda: calc.wait_for_path(str(flag), 30))  # the loop is busy
        wait_until(Path(f"{flag}.started").exists, "the loop to be busy")
        crew.inboxes[1].put(lambda: calc.add(1, 2))  # waits behind it
        wait_until(lambda: asleep_on_doorbells(client, crew.threads[1:]), "the doorbell")
        # The loop reads the pipe before the side channels: it meets this first, and ends.
        parent.send_bytes(struct.pack("!BQ", 0x7F, 0))
        flag.touch()
        assert crew.outboxes[0].get(timeout=SETTLE)[:2] == (True, True)
        ok, error, _ = crew.outboxes[1].get(timeout=SETTLE)
        assert not ok
        assert isinstance(error, pipe_rpc.ConnectionLostError), error
        assert "has not exited" in str(error)
        assert ended.exists()
        client.close()
    finally:
        crew.stop()
        if holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
        process.kill()
        process.join(SETTLE)


@pytest.mark.parametrize("doorbell", ["missing", "a pipe"])
def test_a_channel_frame_without_a_true_doorbell_is_refused_and_the_pipe_goes_on(
    doorbell: str,
) -> None:
    """The child closes what came, refuses the channel, and goes on serving the pipe."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=pipe_rpc.serve, args=(CalcService(), child)
    )
    process.start()
    child.close()
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    fds = [theirs.fileno()] if doorbell == "missing" else [theirs.fileno(), read_end]
    try:
        with pipe_rpc.Client[CalcService](parent, process=process) as client:
            deadline = time.monotonic() + SETTLE
            assert client._core._request(OpenChannel, deadline)
            slot = PendingCall()
            core = client._core
            _, frame = core.protocol.request(functools.partial(Channel, doorbell=True), slot)
            core._send(frame, deadline, fds)
            core._wait_pipe(slot, deadline)
            assert slot.done
            assert not slot.ok
            why = "came without its doorbell" if doorbell == "missing" else "not an eventfd"
            assert why in str(slot.value), slot.value
            theirs.close()
            os.close(read_end)
            ours.settimeout(SETTLE)
            assert ours.recv(1) == b""  # the child closed the socket that came
            if doorbell == "a pipe":
                with pytest.raises(BrokenPipeError):  # and the pipe's end, sent as the doorbell
                    os.write(write_end, b"x")
            assert client.proxy.add(1, 2) == 3
            assert client.proxy.side_channels() == 0
        process.join(SETTLE)
        assert process.exitcode == 0
    finally:
        ours.close()
        theirs.close()
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
        if process.exitcode is None:
            process.kill()
            process.join()


def test_a_call_interrupted_while_it_asks_for_a_side_channel_leaks_no_doorbell() -> None:
    """An exception while a thread waits for its side channel to be granted (here one
    raised at the wait's start, as an asynchronous exception would be) closes the
    doorbell and both sockets it had made."""
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2)
    with server as calc:
        client = client_of(server)
        outcome: list[object] = []

        def in_a_thread() -> None:
            try:
                for _ in range(10):  # meet another call, so the next call asks for a channel
                    meet_another_call(calc, client)
                    if client._core.lanes.local.contended:
                        break
                assert client._core.lanes.local.contended
                gc.collect()
                before = CalcService().eventfd_numbers()  # this process's
                sys.setprofile(_raise_in_the_grant_wait)
                try:
                    calc.add(1, 2)
                except _Interrupted as exc:
                    outcome.append(traceback.extract_tb(exc.__traceback__))
                finally:
                    sys.setprofile(None)
                gc.collect()
                outcome.append(CalcService().eventfd_numbers() - before)
                outcome.append(calc.add(2, 2))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(SETTLE)
        assert not thread.is_alive()
        assert len(outcome) == 3, outcome
        raised, new_eventfds, answer = outcome
        assert "_open" in [frame.name for frame in raised]  # type: ignore[attr-defined]
        assert new_eventfds == set()  # (others may have closed)
        assert answer == 4


def _raise_in_the_grant_wait(frame: Any, event: str, arg: object) -> None:
    if event == "call" and frame.f_code.co_name == "_wait_pipe":
        caller = frame.f_back
        if caller is not None and caller.f_code.co_name == "_request":
            raise _Interrupted


def test_a_wake_within_a_wake_of_the_same_channel_goes_through(workers: Workers) -> None:
    """A garbage collection that starts inside ``wake()`` may run a finalizer that breaks
    the same client, which wakes the same channel again, on the same thread."""
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4)
    with server:
        client = client_of(server)
        assert workers.channels(server.proxy, client) == 4
        channel = next(iter(client._core.lanes))

        def wake_twice() -> None:
            with channel.lock:  # as wake() holds it
                channel.wake()

        waker = threading.Thread(target=wake_twice, daemon=True)
        waker.start()
        waker.join(SETTLE)
        assert not waker.is_alive(), "the second wake waited for the first for ever"
