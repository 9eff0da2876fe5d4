"""A ProtocolError that ends a stream kills the child at once, as a plain call's does
(contract: a child that breaks the protocol is killed). NOT COMMITTED: fails on main."""

from __future__ import annotations

import asyncio
import time

import pytest

import pipe_rpc
from tests.stream_more_services import HostileStreamer

pytestmark = pytest.mark.timeout(60)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2 :][:1] in (b"Z", b"X")


def _killed_without_another_call(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _consume(proxy: HostileStreamer, how: str) -> None:
    if how == "plain call":
        proxy.items_for_a_plain_call()  # the control: "not a stream"
    elif how == "stream":
        list(proxy.points(3))
    else:

        async def main() -> None:
            async for _ in pipe_rpc.astream(proxy.points, 3):
                pass

        asyncio.run(main())


@pytest.mark.parametrize("how", ["plain call", "stream", "astream"])
def test_a_protocol_error_kills_the_untrusted_child_at_once(how: str) -> None:
    with pipe_rpc.spawn(HostileStreamer, untrusted=True, timeout=30) as proxy:
        pid = proxy.pid()
        with pytest.raises(pipe_rpc.ProtocolError, match=r"not a stream|Point"):
            _consume(proxy, how)
        assert _killed_without_another_call(pid), f"child {pid} still runs"
