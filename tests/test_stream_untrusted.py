"""Streams from an untrusted child (contract sections 6 and 8): the items of a stream
are decoded by the restricted decoder like any reply, and a child that breaks the
stream protocol (items past its window, items for a call that is no stream) breaks
the connection with ``ProtocolError`` and, under ``spawn``, is killed.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pipe_rpc
from pipe_rpc._messages import Kind
from pipe_rpc._process import StartMethod
from pipe_rpc._streams import BATCH_ITEMS, WINDOW_ITEMS
from tests.isolation_services import Point, plain_data
from tests.stream_more_services import FLOOD_FRAMES, HostileStreamer, flooding_server

SETTLE = 15.0
METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]

pytestmark = pytest.mark.timeout(60)


def wait_for(predicate: Callable[[], bool], timeout: float = SETTLE) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data[data.rindex(b")") + 2 :][:1] in (b"Z", b"X")


def _spawn(method: StartMethod | None = None, **kwargs: Any) -> pipe_rpc.Server[HostileStreamer]:
    return pipe_rpc.spawn(
        HostileStreamer,
        start_method=method,
        untrusted=True,
        restart="on-failure",
        timeout=30,
        **kwargs,
    )


@pytest.fixture(scope="module")
def honest() -> Iterator[pipe_rpc.Server[HostileStreamer]]:
    """An untrusted child that may send Point."""
    server = _spawn(allowed_types=(Point,))
    try:
        yield server
    finally:
        server.close()


def assert_stream_rejected(
    server: pipe_rpc.Server[HostileStreamer],
    consume: Callable[[HostileStreamer], object],
    match: str,
) -> None:
    """``consume`` raises ProtocolError and imports nothing; the next call gets a fresh
    child, and the old one is gone."""
    assert server.proxy.ping() == "pong"
    pid = server.pid
    assert pid is not None
    before = set(sys.modules)
    with pytest.raises(pipe_rpc.ProtocolError, match=match):
        consume(server.proxy)
    assert set(sys.modules) == before
    assert server.proxy.ping() == "pong"  # restart="on-failure": a fresh child
    assert server.pid != pid
    assert wait_for(lambda: _pid_gone(pid)), f"child {pid} is still running"


# -- what an honest untrusted child may stream ------------------------------------------


def test_plain_data_streams_from_an_untrusted_child(
    honest: pipe_rpc.Server[HostileStreamer],
) -> None:
    rows = list(honest.proxy.plain_rows(300))
    assert [row["i"] for row in rows] == list(range(300))
    assert all({k: v for k, v in row.items() if k != "i"} == plain_data() for row in rows)
    assert type(rows[-1]["lists"][1][1][1]) is bytearray


def test_allowed_types_stream_from_an_untrusted_child(
    honest: pipe_rpc.Server[HostileStreamer],
) -> None:
    points = list(honest.proxy.points(2000))
    assert points == [Point(i, -i) for i in range(2000)]
    assert all(type(point) is Point for point in points)


def test_astream_decodes_an_untrusted_childs_items_the_same_way(
    honest: pipe_rpc.Server[HostileStreamer],
) -> None:
    import asyncio

    async def main() -> list[Point]:
        return [p async for p in pipe_rpc.astream(honest.proxy.points, 5)]

    assert asyncio.run(asyncio.wait_for(main(), SETTLE)) == [Point(i, -i) for i in range(5)]


# -- what it may not ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_streamed_type_not_allowed_is_a_protocol_error(method: StartMethod) -> None:
    server = _spawn(method)  # Point not allowed
    try:
        assert_stream_rejected(server, lambda s: list(s.points(3)), match="Point")
    finally:
        server.close()


def test_a_streamed_item_whose_pickle_runs_a_command_runs_nothing(tmp_path: Path) -> None:
    server = _spawn(allowed_types=(Point,))
    command = f"touch {tmp_path}/ran-in.$PPID"
    try:
        got: list[object] = []

        def consume(s: HostileStreamer) -> None:
            got.extend(s.then_gadget(command))

        assert_stream_rejected(server, consume, match="system")
        assert got == [1][: len(got)]  # the plain item may come first, nothing else
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_items_past_the_window_are_a_protocol_error(tmp_path: Path) -> None:
    """The consumer takes nothing until the child has sent all: the items it holds
    would be past the window."""
    server = _spawn()
    flag = tmp_path / "flooded"
    try:
        got: list[int] = []

        def consume(s: HostileStreamer) -> None:
            items = s.flood(str(flag))
            assert wait_for(flag.exists), "the child did not flood"
            got.extend(items)

        assert_stream_rejected(server, consume, match="window")
        # What came within the window may have been taken; nothing past it was.
        assert len(got) <= WINDOW_ITEMS
    finally:
        server.close()


def test_items_for_a_plain_call_are_a_protocol_error() -> None:
    server = _spawn()
    try:
        assert_stream_rejected(server, lambda s: s.items_for_a_plain_call(), match="not a stream")
    finally:
        server.close()


# -- a hand-written peer (Client, not spawn) ----------------------------------------------


def _client_with_flooding_server(
    frames: int, kind: Kind, flag: Path
) -> tuple[pipe_rpc.Client[HostileStreamer], multiprocessing.process.BaseProcess]:
    ctx = multiprocessing.get_context("forkserver")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=flooding_server, args=(child, frames, int(kind), str(flag)))
    process.start()
    child.close()
    client: pipe_rpc.Client[HostileStreamer] = pipe_rpc.Client(
        parent, process=process, untrusted=True, timeout=30
    )
    return client, process


def _stop(
    client: pipe_rpc.Client[HostileStreamer], process: multiprocessing.process.BaseProcess
) -> None:
    client.close()
    process.join(5)
    if process.exitcode is None:
        process.kill()
        process.join(5)


def test_hand_written_peer_within_its_window_is_served(tmp_path: Path) -> None:
    """The control: the same peer, sending no more than the window, is read in full."""
    frames = WINDOW_ITEMS // BATCH_ITEMS
    flag = tmp_path / "flooded"
    client, process = _client_with_flooding_server(frames, Kind.GENERATOR, flag)
    try:
        items = iter(client.proxy.rows())  # type: ignore[attr-defined]
        assert wait_for(flag.exists), "the peer did not send its items"
        got = [next(items) for _ in range(frames * BATCH_ITEMS)]
        assert got == list(range(BATCH_ITEMS)) * frames
        assert client.broken is None
        items.close()
    finally:
        _stop(client, process)


def test_hand_written_peer_past_its_window_breaks_the_connection(tmp_path: Path) -> None:
    flag = tmp_path / "flooded"
    client, process = _client_with_flooding_server(FLOOD_FRAMES, Kind.GENERATOR, flag)
    try:
        got: list[int] = []
        items = client.proxy.rows()  # type: ignore[attr-defined]
        assert wait_for(flag.exists), "the peer did not send its items"
        with pytest.raises(pipe_rpc.ProtocolError, match="window"):
            got.extend(items)
        assert len(got) <= WINDOW_ITEMS
        assert isinstance(client.broken, pipe_rpc.ProtocolError)
        with pytest.raises(pipe_rpc.ProtocolError):
            client.call("ping")  # the connection stays dead
    finally:
        _stop(client, process)


def test_hand_written_peer_streaming_for_a_plain_call_breaks_the_connection(
    tmp_path: Path,
) -> None:
    client, process = _client_with_flooding_server(1, Kind.METHOD, tmp_path / "flooded")
    try:
        with pytest.raises(pipe_rpc.ProtocolError, match="not a stream"):
            client.proxy.rows()  # type: ignore[attr-defined]
        assert isinstance(client.broken, pipe_rpc.ProtocolError)
        with pytest.raises(pipe_rpc.ProtocolError):
            client.call("ping")
    finally:
        _stop(client, process)
