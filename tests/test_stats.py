"""Server.stats() (contract section 10): calls, errors, timeouts, in flight, latency,
starts, restarts and deaths by reason, counted in the parent."""

from __future__ import annotations

import asyncio
import threading

import attrs
import pytest

import pipe_rpc
from tests.calc_service import CalcService, CustomError
from tests.services import FaultService
from tests.test_side_channels import wait_until

SETTLE = 15.0


def test_calls_errors_timeouts_and_latency_per_method() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    with server as calc:
        for i in range(10):
            assert calc.add(i, 1) == i + 1
        with pytest.raises(CustomError):
            calc.raise_custom(1, "x")
        with pytest.raises(pipe_rpc.CallTimeoutError):
            pipe_rpc.options(calc, timeout=0.1).sleep_then_return(1.0, 0)
        stats = server.stats()
    add = stats.methods["add"]
    assert (add.calls, add.errors, add.timeouts, add.in_flight) == (10, 0, 0, 0)
    assert add.p50_us is not None
    assert add.p99_us is not None
    assert 0 < add.p50_us <= add.p99_us
    assert stats.methods["raise_custom"].errors == 1
    assert stats.methods["sleep_then_return"].timeouts == 1
    assert (stats.starts, stats.restarts, dict(stats.deaths)) == (1, 0, {})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.starts = 2  # type: ignore[misc]
    assert isinstance(stats, pipe_rpc.Stats)
    assert isinstance(add, pipe_rpc.MethodStats)


def test_calls_in_flight_are_counted_while_they_run() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2)
    with server as calc:
        busy = threading.Thread(target=calc.sleep_then_return, args=(1.0, 0))
        busy.start()
        wait_until(lambda: "sleep_then_return" in server.stats().methods, "the busy call")
        assert server.stats().methods["sleep_then_return"].in_flight == 1
        busy.join(SETTLE)
        assert server.stats().methods["sleep_then_return"].in_flight == 0


def test_async_and_submitted_calls_are_counted() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork")
    with server as calc:

        async def main() -> None:
            await asyncio.gather(*(pipe_rpc.acall(calc.add, i, i) for i in range(5)))

        asyncio.run(asyncio.wait_for(main(), SETTLE))
        assert [pipe_rpc.submit(calc.echo, i).result(SETTLE) for i in range(3)] == [0, 1, 2]
        stats = server.stats()
    assert stats.methods["add"].calls == 5
    assert stats.methods["echo"].calls == 3


def test_each_way_a_submitted_call_ends_is_counted_once() -> None:
    server = pipe_rpc.spawn(CalcService, start_method="fork", max_concurrency=2)
    with server as calc:
        failing = pipe_rpc.submit(calc.raise_custom, 1, "x")
        with pytest.raises(CustomError):
            failing.result(SETTLE)
        slow = pipe_rpc.options(calc, timeout=0.2)
        with pytest.raises(pipe_rpc.CallTimeoutError):
            pipe_rpc.submit(slow.sleep_then_return, 5.0, 0).result(SETTLE)
        cancelled = pipe_rpc.submit(calc.sleep_then_return, 5.0, 0)
        assert cancelled.cancel()
        assert cancelled.cancel()  # true again, as for any future: counted once all the same
        assert pipe_rpc.submit(calc.add, 1, 2).result(SETTLE) == 3
        stats = server.stats()
    raised = stats.methods["raise_custom"]
    assert (raised.calls, raised.errors, raised.timeouts, raised.in_flight) == (1, 1, 0, 0)
    slept = stats.methods["sleep_then_return"]
    assert (slept.calls, slept.errors, slept.timeouts, slept.in_flight) == (2, 0, 2, 0)
    added = stats.methods["add"]
    assert (added.calls, added.errors, added.timeouts, added.in_flight) == (1, 0, 0, 0)
    assert added.p50_us is not None
    assert added.p50_us > 0


def test_restarts_and_deaths_by_reason() -> None:
    server = pipe_rpc.spawn(FaultService, start_method="forkserver", restart="on-failure")
    with server as service:
        for code in (3, 3):
            with pytest.raises(pipe_rpc.WorkerDiedError):
                service.exit_now(code)
        with pytest.raises(pipe_rpc.WorkerDiedError):
            service.fault("segfault")
        assert service.add(1, 2) == 3
        stats = server.stats()
    assert stats.starts == 4
    assert stats.restarts == 3
    assert dict(stats.deaths) == {"exit 3": 2, "SIGSEGV": 1}


class SlowFactory:
    def __init__(self) -> None:
        import time

        time.sleep(30)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_factory_past_start_timeout_is_killed_and_said(method: str) -> None:
    with pytest.raises(pipe_rpc.StartupError, match=r"start_timeout=0\.5"):
        pipe_rpc.spawn(SlowFactory, start_method=method, start_timeout=0.5)  # type: ignore[arg-type]
