"""asyncio and futures (contract section 7): acall, submit, aspawn, async def methods.

Real children under every start method where behaviour can differ; every wait
in a test has a deadline (``asyncio.wait_for`` or a future's ``result(timeout)``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures import wait
from typing import Any

import pytest

import pipe_rpc
from pipe_rpc._process import OnTimeout
from tests.calc_service import CalcService, CustomError
from tests.services import StartMethod
from tests.test_side_channels import client_of, wait_until

SETTLE = 15.0
METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]


class AsyncService:
    """A service with ``async def`` methods, which the child runs on its own loop."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    async def double(self, value: int) -> int:
        return value * 2

    async def nap(self, seconds: float, value: Any) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
        return value

    async def fail(self, code: int) -> None:
        await asyncio.sleep(0)
        raise CustomError(code, "async")

    def most_at_once(self) -> int:
        return self.most

    def add(self, a: int, b: int) -> int:
        return a + b

    def sleep_then_return(self, seconds: float, value: Any) -> Any:
        time.sleep(seconds)
        return value


def run(coroutine: Any) -> Any:
    """Run ``coroutine`` on a fresh loop, with a deadline."""
    return asyncio.run(asyncio.wait_for(coroutine, SETTLE))


@pytest.mark.parametrize("method", METHODS)
def test_acall_awaits_calls_many_at_once_from_one_loop(method: StartMethod) -> None:
    async def main() -> None:
        server = await pipe_rpc.aspawn(CalcService, start_method=method, max_concurrency=8)
        async with server as calc:
            assert await pipe_rpc.acall(calc.add, 1, 2) == 3
            results = await asyncio.gather(*(pipe_rpc.acall(calc.add, i, i) for i in range(64)))
            assert results == [2 * i for i in range(64)]
            # they really were in flight together: eight meet in the child at once
            assert (
                await asyncio.gather(*(pipe_rpc.acall(calc.meet, 8) for _ in range(8)))
                == [True] * 8
            )
        assert not server.is_alive()

    run(main())


def test_acall_does_not_block_the_loop() -> None:
    async def main() -> None:
        async with await pipe_rpc.aspawn(CalcService, start_method="fork") as calc:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            assert await pipe_rpc.acall(calc.sleep_then_return, 0.5, "slow") == "slow"
            payload = b"x" * (16 << 20)  # larger than the socket takes at once
            assert await pipe_rpc.acall(calc.echo, payload) == payload
            ticker.cancel()
            assert ticks > 20  # the loop ran while the calls were out

    run(main())


def test_acall_raises_the_remote_exception_with_its_type() -> None:
    async def main() -> None:
        async with await pipe_rpc.aspawn(CalcService, start_method="fork") as calc:
            with pytest.raises(CustomError) as raised:
                await pipe_rpc.acall(calc.raise_custom, 7, "detail")
            assert isinstance(raised.value.__cause__, pipe_rpc.RemoteTraceback)
            with pytest.raises(pipe_rpc.CallTimeoutError):
                await pipe_rpc.acall(pipe_rpc.options(calc, timeout=0.2).sleep_then_return, 2, 1)
            assert await pipe_rpc.acall(calc.add, 2, 2) == 4

    run(main())


@pytest.mark.parametrize("method", METHODS)
def test_async_def_methods_return_awaitables_and_run_as_tasks(method: StartMethod) -> None:
    async def main() -> None:
        server = await pipe_rpc.aspawn(AsyncService, start_method=method, max_concurrency=4)
        async with server as service:
            assert await service.double(21) == 42
            assert await pipe_rpc.acall(service.double, 4) == 8
            naps = [service.nap(0.2, i) for i in range(8)]
            assert await asyncio.gather(*naps) == list(range(8))
            assert 2 <= service.most_at_once() <= 4  # tasks, at most max_concurrency at once
            with pytest.raises(CustomError) as raised:
                await service.fail(5)
            assert raised.value.code == 5
            assert service.add(1, 1) == 2  # plain methods run as ever

    run(main())


def test_an_async_def_method_called_by_name_returns_its_value() -> None:
    with pipe_rpc.spawn(AsyncService, start_method="fork") as service:
        client = client_of(pipe_rpc_server(service))
        assert client.call("double", 5) == 10


@pytest.mark.parametrize("on_timeout", ["abandon", "kill"])
def test_cancelling_the_task_acts_as_the_calls_timeout(on_timeout: OnTimeout) -> None:
    server = pipe_rpc.spawn(
        CalcService, start_method="fork", on_timeout=on_timeout, restart="on-failure"
    )

    async def main() -> None:
        calc = server.proxy
        first = server.pid
        task = asyncio.ensure_future(pipe_rpc.acall(calc.sleep_then_return, 0.5, "late"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if on_timeout == "kill":
            assert not _alive(first)
        assert await pipe_rpc.acall(calc.add, 1, 2) == 3  # the proxy stays usable
        if on_timeout == "abandon":
            assert server.pid == first
            await asyncio.sleep(0.5)
            assert await pipe_rpc.acall(calc.echo, "next") == "next"  # not the late reply
            assert client_of(server).late_replies == 1

    with server:
        run(main())


def test_a_child_that_dies_fails_its_acalls_at_once() -> None:
    async def main() -> None:
        async with await pipe_rpc.aspawn(CalcService, start_method="fork") as calc:
            server = pipe_rpc_server(calc)
            task = asyncio.ensure_future(pipe_rpc.acall(calc.sleep_then_return, 10, 0))
            await asyncio.sleep(0.1)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(pipe_rpc.WorkerDiedError, match="SIGKILL"):
                await task
            assert time.monotonic() - started < 5.0

    run(main())


def test_sync_threads_and_a_loop_share_one_proxy() -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=8) as calc:
        errors: list[BaseException] = []
        stop = time.monotonic() + 1.5

        def worker(tag: int) -> None:
            try:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    assert calc.echo((tag, n)) == (tag, n)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(3)]
        for thread in threads:
            thread.start()

        async def main() -> int:
            n = 0
            while time.monotonic() < stop:
                batch = [pipe_rpc.acall(calc.echo, ("loop", n + i)) for i in range(16)]
                assert await asyncio.gather(*batch) == [("loop", n + i) for i in range(16)]
                n += 16
            return n

        assert run(main()) > 0
        for thread in threads:
            thread.join(SETTLE)
        assert not errors, errors


def test_submit_returns_a_future_once_the_call_is_sent() -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4) as calc:
        futures = [pipe_rpc.submit(calc.add, i, 1) for i in range(50)]
        assert [future.result(SETTLE) for future in futures] == list(range(1, 51))
        failing = pipe_rpc.submit(calc.raise_custom, 3, "x")
        with pytest.raises(CustomError):
            failing.result(SETTLE)
        timed = pipe_rpc.submit(pipe_rpc.options(calc, timeout=0.2).sleep_then_return, 2, 0)
        with pytest.raises(pipe_rpc.CallTimeoutError):
            timed.result(SETTLE)


@pytest.mark.parametrize("on_timeout", ["abandon", "kill"])
def test_cancelling_a_future_acts_as_the_calls_timeout(on_timeout: OnTimeout) -> None:
    server = pipe_rpc.spawn(
        CalcService, start_method="fork", on_timeout=on_timeout, restart="on-failure"
    )
    with server as calc:
        first = server.pid
        future = pipe_rpc.submit(calc.sleep_then_return, 0.5, "late")
        assert future.cancel()
        assert future.cancelled()
        if on_timeout == "kill":
            assert not _alive(first)
        assert calc.add(1, 2) == 3
        assert not future.cancel() or future.cancelled()
        done = pipe_rpc.submit(calc.add, 1, 1)
        assert done.result(SETTLE) == 2
        assert not done.cancel()  # answered already


def test_acall_and_submit_refuse_what_is_not_a_proxy_method() -> None:
    with pytest.raises(TypeError, match="method of a pipe_rpc proxy"):
        pipe_rpc.submit(print, 1)
    with pytest.raises(TypeError, match="method of a pipe_rpc proxy"):
        run(pipe_rpc.acall(print, 1))


def test_aclose_and_async_with_on_a_closed_server() -> None:
    async def main() -> None:
        server = await pipe_rpc.aspawn(CalcService, start_method="forkserver")
        await server.aclose()
        assert not server.is_alive()
        with pytest.raises(pipe_rpc.ClientClosedError):
            async with server:
                pass

    run(main())


def pipe_rpc_server(proxy: object) -> pipe_rpc.Server[Any]:
    server = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]
    assert isinstance(server, pipe_rpc.Server)
    return server


def _alive(pid: int | None) -> bool:
    assert pid is not None
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split()[2] == "Z":
                return False
        time.sleep(0.01)
    return True


def test_a_submitted_call_completes_while_another_thread_waits_on_the_pipe() -> None:
    """The thread that waits for submitted calls may follow another caller on the
    pipe: the future must still be completed."""
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2) as calc:
        busy = threading.Thread(target=calc.sleep_then_return, args=(1.0, 0))
        busy.start()
        wait_until(lambda: client_of(pipe_rpc_server(calc))._core.in_flight > 0, "it")
        assert pipe_rpc.submit(calc.add, 1, 2).result(SETTLE) == 3
        busy.join(SETTLE)


def test_futures_nobody_waits_on_complete_after_some_that_result_waited_on() -> None:
    """``result()`` reads the reply in its own thread, and the connection's thread
    then leaves calls to it for a moment: futures that nobody waits on must still be
    completed (done callbacks run, ``wait`` returns) by that thread."""
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4) as calc:
        for i in range(20):  # result() settles these itself
            assert pipe_rpc.submit(calc.add, i, 1).result(SETTLE) == i + 1
        seen: list[int] = []
        lock = threading.Lock()

        def note(future: Any) -> None:
            with lock:
                seen.append(future.result(0))

        futures = [pipe_rpc.submit(calc.add, i, 100) for i in range(20)]
        for future in futures:
            future.add_done_callback(note)
        _, not_done = wait(futures, timeout=SETTLE)
        assert not not_done
        wait_until(lambda: len(seen) == 20, "the done callbacks")
        assert sorted(seen) == [i + 100 for i in range(20)]


def test_a_result_with_a_short_timeout_leaves_the_call_to_complete_later() -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork") as calc:
        future = pipe_rpc.submit(calc.sleep_then_return, 0.5, "late")
        with pytest.raises(FutureTimeoutError):
            future.result(0.05)
        assert not future.done()
        assert future.result(SETTLE) == "late"
        assert calc.add(1, 2) == 3


def test_results_waited_on_from_many_threads_each_get_their_own() -> None:
    with pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=4) as calc:
        errors: list[BaseException] = []

        def run(base: int) -> None:
            try:
                for i in range(200):
                    assert pipe_rpc.submit(calc.add, base, i).result(SETTLE) == base + i
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(n * 1000,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SETTLE)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []


def test_a_cancelled_future_is_done_for_wait_and_as_completed() -> None:
    """``concurrent.futures.wait`` and ``as_completed`` count a future as done once it
    is cancelled and notified: a cancelled call's future must not leave them waiting
    (for their whole timeout, or for ever without one), whether they began waiting
    before the cancel or after it."""
    with pipe_rpc.spawn(CalcService, start_method="forkserver") as calc:
        before = pipe_rpc.submit(calc.sleep_then_return, 2, "late")
        waiting: list[Any] = []
        waiter = threading.Thread(target=lambda: waiting.append(wait([before], timeout=SETTLE)))
        waiter.start()
        wait_until(lambda: bool(before._waiters), "wait() to be waiting")
        t0 = time.monotonic()
        assert before.cancel()
        waiter.join(SETTLE)
        assert waiting
        assert before in waiting[0].done
        after = pipe_rpc.submit(calc.sleep_then_return, 2, "late")
        assert after.cancel()
        assert wait([after], timeout=SETTLE).done == {after}
        assert list(concurrent.futures.as_completed([after], timeout=SETTLE)) == [after]
        assert time.monotonic() - t0 < SETTLE  # not their timeouts
