"""Streams among threads (contract section 8): a stream opened on a thread that has a
side channel, and streams next to plain calls in a child with a thread pool.

A stream goes on the pipe whatever the thread (its credit and cancel follow it
there), while the thread's plain calls go on its side channel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import pipe_rpc
from tests.stream_more_services import StreamCalc
from tests.test_side_channels import Workers, client_of

SETTLE = 15.0

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


@pytest.fixture
def workers() -> Iterator[Workers]:
    crew = Workers(4)
    yield crew
    crew.stop()


def test_a_thread_with_a_side_channel_streams_on_the_pipe(workers: Workers) -> None:
    server = pipe_rpc.spawn(StreamCalc, max_concurrency=4)
    with server as calc:
        client = client_of(server)
        assert workers.channels(calc, client) == 4

        def stream_and_call(n: int) -> tuple[bool, list[bool], bool]:
            has_channel = client._core.lanes.local.channel is not None
            rows = calc.rows(20_000 + n)
            first = [next(rows) for _ in range(10)]
            on_the_pipe = calc.streams_on_the_pipe()  # a plain call, on the side channel
            rest = list(rows)
            ok = first + rest == list(range(20_000 + n)) and calc.add(n, 1) == n + 1
            return has_channel, on_the_pipe, ok

        outcomes = workers.run(stream_and_call)
        for has_channel, on_the_pipe, ok in outcomes:
            assert has_channel
            assert ok
            assert on_the_pipe  # its own stream at least is open
            assert all(on_the_pipe)
        assert len(client._core.lanes) == 4  # the threads kept their side channels
        assert calc.side_channels() == 4


def test_a_stream_runs_while_every_pool_thread_is_busy() -> None:
    """``max_concurrency=4``: three calls wait for each other in the pool while the
    stream's generator, on the loop's thread, goes on producing."""
    with pipe_rpc.spawn(StreamCalc, max_concurrency=4, timeout=SETTLE) as calc:
        met: list[bool] = []
        rows = calc.rows(50_000)
        assert next(rows) == 0
        threads = [threading.Thread(target=lambda: met.append(calc.meet(4))) for _ in range(3)]
        for thread in threads:
            thread.start()
        got = [next(rows) for _ in range(20_000)]  # the three are (or soon are) waiting
        assert got == list(range(1, 20_001))
        assert calc.meet(4)  # the fourth: all four ran at once in the pool
        for thread in threads:
            thread.join(SETTLE)
        assert met == [True] * 3
        assert list(rows) == list(range(20_001, 50_000))


def test_streams_and_plain_calls_interleave_in_a_pooled_child() -> None:
    with pipe_rpc.spawn(StreamCalc, max_concurrency=4, timeout=SETTLE) as calc:
        errors: list[BaseException] = []

        def caller(n: int) -> None:
            try:
                for i in range(200):
                    assert calc.add(n, i) == n + i
                    if i % 50 == 0:
                        assert list(calc.rows(1000 + i)) == list(range(1000 + i))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        a, b = calc.rows(30_000), calc.rows(30_000)
        for expected in range(30_000):
            assert (next(a), next(b)) == (expected, expected)
            if expected % 1000 == 0:
                assert calc.sleep_then_return(0, expected) == expected
        for thread in threads:
            thread.join(SETTLE)
        assert not errors, errors
        assert next(a, None) is None
        assert next(b, None) is None
