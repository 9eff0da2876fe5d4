"""Services for the streaming tests beyond ``tests/stream_services.py``;
importable by children under every start method.

``HostileStreamer`` writes hand-made frames on its own pipe (as
``tests.isolation_services.Hostile`` does for replies); ``flooding_server`` is a
whole hand-written peer that answers a stream call past its window.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from pipe_rpc._codec import Codec, hello
from pipe_rpc._messages import Items, Kind, Tag
from pipe_rpc._streams import BATCH_ITEMS, WINDOW_ITEMS
from tests.calc_service import CalcService
from tests.isolation_services import (
    BODY_HEAD,
    Point,
    SystemGadget,
    _no_core_dumps,
    _server_loop,
    plain_data,
    resident_bytes,
)

#: Frames of ``BATCH_ITEMS`` items that together overrun the window by one frame.
FLOOD_FRAMES = WINDOW_ITEMS // BATCH_ITEMS + 1


def _stream_call_id() -> int:
    """The call id of the stream whose generator runs this code (found on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        stream = frame.f_locals.get("stream")
        call = getattr(stream, "call", None)
        if call is not None:
            return int(call.call_id)
        frame = frame.f_back  # type: ignore[assignment]
    raise LookupError("not running inside a pipe_rpc stream")


def _items_frames(call_id: int, frames: int, first_seq: int = 1) -> list[bytes]:
    """``frames`` honest ``Items`` frames of ``BATCH_ITEMS`` ints each, for ``call_id``."""
    codec = Codec()
    out = []
    for seq in range(first_seq, first_seq + frames):
        segments = codec.encode(Items(call_id, seq, list(range(BATCH_ITEMS))))
        out.append(b"".join(bytes(memoryview(s).cast("B")) for s in segments))
    return out


class HostileStreamer:
    """Generator methods an untrusted child may serve, honest and not."""

    def __init__(self) -> None:
        _no_core_dumps()

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "pong"

    def plain_rows(self, n: int) -> Iterator[dict[str, Any]]:
        for i in range(n):
            yield {"i": i, **plain_data()}

    def points(self, n: int) -> Iterator[Point]:
        for i in range(n):
            yield Point(i, -i)

    def then_gadget(self, command: str) -> Iterator[object]:
        """One plain item, then an item whose pickle runs ``command`` when loaded."""
        yield 1
        yield SystemGadget(command)

    def flood(self, flag_path: str) -> Iterator[int]:
        """Write ``FLOOD_FRAMES`` frames of items at once, ignoring the window; then
        create ``flag_path``."""
        call_id = _stream_call_id()
        main = _server_loop().main
        for frame in _items_frames(call_id, FLOOD_FRAMES):
            main.send([frame])
        with open(flag_path, "w"):
            pass
        yield from ()

    def items_for_a_plain_call(self) -> None:
        """Answer this plain call (not a stream) with a frame of items."""
        from tests.isolation_services import _current_call_id

        (frame,) = _items_frames(_current_call_id(), 1)
        _server_loop().main.send([frame])


def flooding_server(conn: Connection, frames: int, kind: int, flag_path: str) -> None:
    """A hand-written peer: hello (``rows`` is of ``kind``), then ``frames`` frames of
    items in answer to the first call, whatever the credit; then it creates ``flag_path``."""
    _no_core_dumps()
    fd = conn.fileno()
    conn.recv_bytes()  # the client's hello
    (segment,) = Codec().encode(hello({"rows": Kind(kind)}))
    os.write(fd, bytes(memoryview(segment).cast("B")))
    body = conn.recv_bytes()
    (tag, call_id) = BODY_HEAD.unpack_from(body)
    assert tag == Tag.CALL, tag
    for frame in _items_frames(call_id, frames):
        os.write(fd, frame)
    with open(flag_path, "w"):
        pass
    with contextlib.suppress(EOFError, OSError):
        while True:
            conn.recv_bytes()


class StreamCalc(CalcService):
    """``CalcService`` (``meet``, ``side_channels``, ...) with generator methods."""

    def rows(self, n: int) -> Iterator[int]:
        yield from range(n)

    def chunks(self, count: int, size: int) -> Iterator[bytes]:
        """``count`` items of ``size`` bytes, each a fresh buffer that says its number."""
        for i in range(count):
            self.__dict__["_produced"] = i + 1
            yield i.to_bytes(8, "little") * (size // 8)

    def produced(self) -> int:
        """How many items ``chunks`` has made so far."""
        return int(self.__dict__.get("_produced", 0))

    def streams_on_the_pipe(self) -> list[bool]:
        """For each open stream of this child, whether its frames go on the pipe."""
        loop = _server_loop()
        return [stream.channel is loop.main for stream in list(loop.streams.open.values())]

    def resident_bytes(self) -> int:
        return resident_bytes(os.getpid())
