"""Streams on the server side: generator methods, advanced a step at a time.

A call whose method returns a generator becomes an open stream instead of a
reply. The server loop advances each open stream between its other work, one
batch at a time, so a stream never holds up other calls, even with
``max_concurrency=1``. A batch is as many items as come within a short budget
(``BATCH_SECONDS``, ``BATCH_BYTES``), sent as one ``Items`` frame: a stream of
small items costs one write for many.

Flow control is by credit, as in h2: a stream may have at most ``WINDOW_ITEMS``
items and ``WINDOW_BYTES`` bytes sent and not yet taken by the consumer; the
client's ``Credit`` frames say how many frames were taken. A stream ends with
the call's ``Return`` (after ``StopIteration``) or ``Raise``; a ``Cancel`` closes
the generator (its ``finally`` runs) and sends nothing more.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from itertools import islice
from typing import Any

from ._errors import SerializationError
from ._messages import Call, Cancel, Credit, Fail, FailKind, Items, Raise, Return
from ._wire import Buffer

#: At most this many items sent and not yet taken by the consumer.
WINDOW_ITEMS = 1024
#: At most this many items in one frame.
BATCH_ITEMS = 256
#: At most this many bytes of items sent and not yet taken by the consumer.
WINDOW_BYTES = 512 << 10
#: A batch ends once its pickled items reach this size...
BATCH_BYTES = 64 << 10
#: ... or once making it took this long.
BATCH_SECONDS = 0.001
#: Items drawn from a generator at once, at most, between two checks of those bounds.
_DRAW_MOST = 32


class _Stream:
    """One open stream: its generator, where its frames go, and its window."""

    __slots__ = ("bytes_out", "call", "channel", "generator", "in_flight", "items_out", "seq")

    def __init__(self, channel: Any, call: Call, generator: Generator[Any, Any, Any]) -> None:
        self.channel = channel
        self.call = call
        self.generator = generator
        self.in_flight: deque[tuple[int, int]] = deque()  # (items, bytes) of each frame sent
        self.items_out = 0
        self.bytes_out = 0
        self.seq = 0

    @property
    def runnable(self) -> bool:
        return self.items_out < WINDOW_ITEMS and self.bytes_out < WINDOW_BYTES


class Streams:
    """A server loop's open streams.

    Args:
        send: ``send(channel, segments)`` writes a frame on the channel a call came by.
    """

    def __init__(self, send: Callable[[Any, list[Buffer]], None]) -> None:
        self._send = send
        #: The open streams, by call id (empty: nothing to advance).
        self.open: dict[int, _Stream] = {}

    def start(self, channel: Any, call: Call, generator: Generator[Any, Any, Any]) -> None:
        """Open a stream for ``call``, whose method returned ``generator``."""
        self.open[call.call_id] = _Stream(channel, call, generator)

    def runnable(self) -> bool:
        """Has any open stream room in its window?"""
        return any(stream.runnable for stream in self.open.values())

    def control(self, message: Credit | Cancel) -> None:
        """Take a consumer's ``Credit`` or ``Cancel`` (for a stream that ended: ignored)."""
        stream = self.open.get(message.call_id)
        if stream is None:
            return
        if isinstance(message, Cancel):
            del self.open[message.call_id]
            stream.generator.close()  # GeneratorExit: its finally runs here
            return
        for _ in range(min(message.frames, len(stream.in_flight))):
            items, size = stream.in_flight.popleft()
            stream.items_out -= items
            stream.bytes_out -= size

    def advance(self) -> None:
        """Give each stream with room in its window one batch."""
        for call_id, stream in list(self.open.items()):
            if stream.runnable and not self._batch(stream):
                self.open.pop(call_id, None)

    def _batch(self, stream: _Stream) -> bool:
        """Send one batch of ``stream``; False once it has ended."""
        batch: list[Any] = []
        ended: tuple[bool, Any] | None = None
        room = min(BATCH_ITEMS, WINDOW_ITEMS - stream.items_out)
        deadline = time.perf_counter() + BATCH_SECONDS
        size = 0
        # Nothing in flight: the consumer waits, so the first item goes alone at once
        # (the next step may take long). With frames in flight, the consumer has work,
        # and items wait a moment for others to share their frame.
        alone = not stream.items_out
        step = 1
        try:
            while True:
                # Small items are drawn a few at a time, in C; a big one ends the batch.
                before = len(batch)
                batch.extend(islice(stream.generator, step))
                drawn = len(batch) - before
                if drawn < step:  # the generator returned
                    ended = (True, None)
                    break
                size += drawn * _rough_size(batch[-1])
                if (
                    alone
                    or len(batch) >= room
                    or size >= BATCH_BYTES
                    or time.perf_counter() >= deadline
                ):
                    break
                step = min(step * 2, _DRAW_MOST, room - len(batch))
        except BaseException as exc:  # the generator raised: the stream ends with it
            ended = (False, exc)
        protocol = stream.channel.protocol
        if batch:
            try:
                self._send_items(stream, batch)
            except SerializationError as exc:
                stream.generator.close()
                message = f"an item of {stream.call.method}() could not be pickled: {exc}"
                failure = Fail(stream.call.call_id, FailKind.SERIALIZATION, message)
                self._send(stream.channel, protocol.codec.encode(failure))
                return False
        if ended is None:
            return True
        ok, value = ended
        end = Return(stream.call.call_id, None) if ok else Raise(stream.call.call_id, value)
        self._send(stream.channel, protocol.codec.encode(end))
        return False

    def _send_items(self, stream: _Stream, batch: list[Any]) -> None:
        """Send ``batch`` as one frame; if it will not pickle, the items that do, one
        by one, up to the first that does not, which raises ``SerializationError``."""
        codec = stream.channel.protocol.codec
        try:
            frame = codec.encode(Items(stream.call.call_id, stream.seq + 1, batch))
        except SerializationError:
            if len(batch) == 1:
                raise
            for item in batch:
                self._send_items(stream, [item])
            return
        stream.seq += 1
        sent = sum(len(memoryview(segment).cast("B")) for segment in frame)
        stream.in_flight.append((len(batch), sent))
        stream.items_out += len(batch)
        stream.bytes_out += sent
        self._send(stream.channel, frame)

    def close_all(self) -> None:
        """The loop ends: close every open generator."""
        for stream in self.open.values():
            try:
                stream.generator.close()
            except BaseException:
                pass
        self.open.clear()


def _rough_size(item: Any) -> int:
    """A cheap guess of an item's pickled size, to end a batch of big items early."""
    if isinstance(item, bytes | bytearray | memoryview | str):
        return len(item)
    return 16
