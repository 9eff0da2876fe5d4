"""A slow consumer of a long stream of big items (contract section 8: neither process
buffers without bound). Memory is read from ``/proc/<pid>/status`` (VmRSS); the
bounds are generous: a window is 1 MiB, the bounds are tens of MiB, and the stream
is hundreds.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import pipe_rpc
from pipe_rpc._streams import WINDOW_BYTES
from tests.isolation_services import resident_bytes
from tests.services import StartMethod
from tests.stream_more_services import StreamCalc

MiB = 1 << 20
#: Bytes streamed in each test.
STREAMED = 320 * MiB
#: How much either process may grow over a stream, after a warm-up stream of 20 MiB.
BOUND = 64 * MiB
SETTLE = 15.0

pytestmark = pytest.mark.timeout(120)


def _ahead_by(calc: StreamCalc, taken: int) -> int:
    """How far the child's generator is ahead of ``taken``, once it has stopped (its
    window is full, or the stream ended): polled until two reads agree."""
    deadline = time.monotonic() + SETTLE
    last = -1
    while (produced := calc.produced()) != last:
        assert time.monotonic() < deadline, "the child never stopped producing"
        last = produced
        time.sleep(0.02)
    return produced - taken


@pytest.mark.parametrize(
    ("method", "size"), [("fork", MiB), ("spawn", MiB), ("fork", MiB // 4)], ids=str
)
def test_a_slow_consumer_of_big_items_keeps_both_processes_bounded(
    method: StartMethod, size: int
) -> None:
    count = STREAMED // size
    every = count // 16  # the consumer stops to look this often
    with pipe_rpc.spawn(StreamCalc, start_method=method, timeout=SETTLE) as calc:
        for _ in calc.chunks(20 * MiB // size, size):  # a warm-up: both sides' buffers
            pass
        child_base = calc.resident_bytes()
        parent_base = resident_bytes(os.getpid())
        child_rss: list[int] = []
        parent_rss: list[int] = []
        ahead: list[int] = []
        for i, item in enumerate(calc.chunks(count, size)):
            assert len(item) == size
            assert item[:8] == i.to_bytes(8, "little")
            hashlib.sha256(item).digest()  # the consumer's work
            del item
            if i % every == 0:
                # The slow part: the child runs ahead as far as its window lets it.
                ahead.append(_ahead_by(calc, i + 1))
                child_rss.append(calc.resident_bytes())
                parent_rss.append(resident_bytes(os.getpid()))
        assert calc.produced() == count
        # The child ran ahead no further than its window (and, for items smaller than
        # the window, it did run ahead: the bounds below held while it could).
        assert max(ahead) <= WINDOW_BYTES // size + 2, ahead
        if size < WINDOW_BYTES:
            assert max(ahead) >= 1, ahead
        child_growth = max(child_rss) - child_base
        parent_growth = max(parent_rss) - parent_base
        assert child_growth < BOUND, f"child grew by {child_growth / MiB:.0f} MiB"
        assert parent_growth < BOUND, f"parent grew by {parent_growth / MiB:.0f} MiB"
