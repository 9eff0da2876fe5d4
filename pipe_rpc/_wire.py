"""The wire: how frames are laid out, cut from a byte stream, and built.

A frame is what ``Connection.send_bytes`` would write: a 4-byte big-endian
length (``-1`` then an 8-byte length above 2 GiB), then the body. The body is
``tag (1 byte) | call id (8 bytes) | payload``. A payload with out-of-band
buffers has ``OUT_OF_BAND`` set in its tag and starts with the count and sizes
of the buffers, which follow the pickle; a size with ``AS_BYTES`` set stands for
a ``bytes`` object. This module is the one place that knows the layout; it
pickles nothing and does no I/O.

Interrupts. A ``KeyboardInterrupt`` (or any exception a signal handler raises)
may land between any two bytecodes of the thread that reads, as soon as a C
call returns. ``FrameReader`` is therefore kept so that no such exception can
lose or repeat a byte: the transport keeps what it reads inside the very C call
that reads it (in ``chunks``, by ``list.extend(map(os.read, ...))``, or first in
a dictionary of its own, see ``_transport``), the counts of reads in place land
in ``_Big.counts`` the same way, and ``cut()`` changes
``chunks`` only by single subscript stores, each of which leaves a valid stream.
What an interrupt can do is make ``cut()`` hand out a whole frame twice; the
client's pending table drops the second copy as a late reply.
"""

from __future__ import annotations

import mmap
import struct
import sys
from collections import deque
from collections.abc import Collection
from pickle import PickleBuffer
from typing import cast

from ._errors import ProtocolError

Buffer = bytes | bytearray | memoryview | PickleBuffer
#: One frame's body as the reader hands it out.
Body = bytes | bytearray | memoryview

#: Length, tag and call id: the head of a frame under 2 GiB.
HEAD = struct.Struct("!iBQ")
#: Tag and call id: the head of a body.
BODY_HEAD = struct.Struct("!BQ")
#: The size of a body's head, before its payload.
BODY_HEAD_SIZE = BODY_HEAD.size
LENGTH = struct.Struct("!i")
LONG_LENGTH = struct.Struct("!iQ")
_LONG = struct.Struct("!Q")
_COUNT = struct.Struct("!I")
_SIZE = struct.Struct("!Q")
#: Set in a tag whose payload carries out-of-band buffers.
OUT_OF_BAND = 0x80
#: In the buffer table: this buffer was a ``bytes`` object; rebuild it as one.
AS_BYTES = 1 << 63
MAX_SHORT_FRAME = 0x7FFFFFFF
#: Below this a frame is joined into one bytes object before writing. Such a
#: write to a Unix stream socket is all or nothing (one buffer of the kernel's).
JOIN_BELOW = 1 << 16
#: A frame at least this large is read in place into a buffer of its own.
BIG_FRAME = 1 << 20
#: A big frame's buffer up to this size is kept, and reused once nothing refers to it.
SPARE_MAX = 4 << 20


class FrameTooLargeError(ProtocolError):
    """A frame's length is over the bound the reader was given."""


# -- building frames ---------------------------------------------------------


def length_prefix(size: int) -> bytes:
    """The length that starts a frame whose body is ``size`` bytes."""
    if size <= MAX_SHORT_FRAME:
        return LENGTH.pack(size)
    return LONG_LENGTH.pack(-1, size)


def in_band_frame(tag: int, call_id: int, payload: bytes) -> list[Buffer]:
    """A frame with no out-of-band buffer; a short one packed into one segment."""
    size = len(payload) + BODY_HEAD_SIZE
    if size < JOIN_BELOW:
        return [HEAD.pack(size, tag, call_id) + payload]
    return [length_prefix(size) + BODY_HEAD.pack(tag, call_id), payload]


def frame(
    tag: int,
    call_id: int,
    payload: bytes,
    buffers: list[PickleBuffer],
    as_bytes: Collection[PickleBuffer] = (),
) -> list[Buffer]:
    """Lay out one frame as segments ready for ``os.writev``.

    ``as_bytes``: the buffers that stand for ``bytes`` objects (flagged ``AS_BYTES``).
    """
    if not buffers:
        return in_band_frame(tag, call_id, payload)
    # Loops, not generators: a generator left unfinished is closed by the garbage
    # collector, and an interrupt landing there would be printed, not raised.
    raws = [b.raw() for b in buffers]
    marked = {id(m) for m in as_bytes}
    sizes = [
        r.nbytes | AS_BYTES if id(b) in marked else r.nbytes
        for b, r in zip(buffers, raws, strict=True)
    ]
    table = _COUNT.pack(len(raws)) + b"".join([_SIZE.pack(size) for size in sizes])
    size = BODY_HEAD_SIZE + len(table) + len(payload) + sum([r.nbytes for r in raws])
    head = length_prefix(size) + BODY_HEAD.pack(tag | OUT_OF_BAND, call_id) + table
    return [head, payload, *raws]


def split_out_of_band(payload: memoryview) -> tuple[memoryview, list[memoryview | bytes]]:
    """The pickle and the buffers of an out-of-band payload."""
    try:
        (count,) = _COUNT.unpack_from(payload)
        sizes = [_SIZE.unpack_from(payload, 4 + 8 * i)[0] for i in range(count)]
    except struct.error as exc:
        raise ProtocolError("truncated out-of-band buffer table") from exc
    start = 4 + 8 * count
    end = len(payload) - sum(size & ~AS_BYTES for size in sizes)
    if end < start:
        raise ProtocolError("out-of-band buffers are larger than their frame")
    buffers: list[memoryview | bytes] = []
    offset = end
    for size in sizes:
        if size & AS_BYTES:
            size &= ~AS_BYTES
            buffers.append(bytes(payload[offset : offset + size]))
        else:
            buffers.append(payload[offset : offset + size])
        offset += size
    return payload[start:end], buffers


# -- cutting a stream into frames ---------------------------------------------


class _Big:
    """A big frame being read in place; ``counts`` holds what each read added."""

    __slots__ = ("buffer", "counts", "size")

    def __init__(self, buffer: mmap.mmap, size: int, have: int) -> None:
        self.buffer = buffer
        self.size = size
        self.counts = [have]

    @property
    def filled(self) -> int:
        return sum(self.counts)


class FrameReader:
    """Cuts a stream of bytes (as ``Connection.send_bytes`` frames it) into frame bodies.

    The transport appends what it reads to ``chunks`` (or, while ``read_target()``
    is not ``None``, reads into that and appends the count to ``target_counts()``),
    then calls ``cut()``, which moves whole frames to ``ready``.

    Args:
        max_frame: refuse any frame whose body is longer (``None``: no bound).
    """

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        #: Bytes read and not yet cut; a ``_Big`` in place of a big frame's head.
        self.chunks: list[bytes | memoryview | _Big] = []
        #: Whole frame bodies, oldest first, for the owner to take.
        self.ready: deque[Body] = deque()
        #: The last big buffers, kept for reuse: ``SPARE_MAX`` bytes of them at most.
        self._spares: list[mmap.mmap] = []

    def read_target(self) -> memoryview | None:
        """Where to read the next bytes directly, or ``None`` to append them to ``chunks``."""
        chunks = self.chunks
        if len(chunks) != 1 or type(chunks[0]) is not _Big:
            return None
        big = chunks[0]
        filled = big.filled
        if filled >= big.size:  # whole, and not cut yet (an interrupt came first)
            return None
        return memoryview(big.buffer)[filled : big.size]

    def target_counts(self) -> list[int]:
        """The list a read into ``read_target()`` appends its count to."""
        big = self.chunks[0]
        assert type(big) is _Big
        return big.counts

    def cut(self) -> None:
        """Move every whole frame in ``chunks`` to ``ready``.

        Raises:
            ProtocolError: the stream broke the framing (``FrameTooLargeError``: over the bound).
        """
        chunks, ready = self.chunks, self.ready
        while chunks:
            head = chunks[0]
            if isinstance(head, _Big):
                if head.filled < head.size:
                    return
                ready.append(memoryview(head.buffer)[: head.size])
                del chunks[0]
                continue
            end = len(head)
            if end > 4:  # the hot path: exactly one whole frame
                (size,) = LENGTH.unpack_from(head)
                if size == end - 4 and (self.max_frame is None or size <= self.max_frame):
                    ready.append(memoryview(head)[4:])
                    del chunks[0]
                    continue
            pos = self._cut_chunk(head)
            if pos == end:
                del chunks[0]
                continue
            if pos:
                chunks[0] = memoryview(head)[pos:]
                continue
            # A frame's start without its end: wait for more, or read it in place.
            if len(chunks) > 1 and type(chunks[1]) is not _Big:
                chunks[0:2] = [b"".join(cast("list[bytes | memoryview]", chunks[0:2]))]
                continue
            big = self._big_start(head)
            if big is not None:
                chunks[0] = big
            return

    def _cut_chunk(self, data: bytes | memoryview) -> int:
        """Append the whole frames at the start of ``data`` to ``ready``; return their length."""
        end = len(data)
        pos = 0
        frames: list[Body] = []
        while end - pos >= 4:
            size, head = self._length(data, pos)
            if size < 0:
                break
            start = pos + head
            if end - start < size:
                break
            frames.append(memoryview(data)[start : start + size])
            pos = start + size
        self.ready.extend(frames)
        return pos

    def _length(self, data: bytes | memoryview, pos: int) -> tuple[int, int]:
        """The body size and head size of the frame at ``pos`` (-1: not all of its head came)."""
        (size,) = LENGTH.unpack_from(data, pos)
        head = 4
        if size < 0:
            if size != -1:
                raise ProtocolError(f"frame length {size} is negative")
            if len(data) - pos < 12:
                return -1, 0
            (size,) = _LONG.unpack_from(data, pos + 4)
            head = 12
        if self.max_frame is not None and size > self.max_frame:
            raise FrameTooLargeError(
                f"frame of {size} bytes is over the bound of {self.max_frame} bytes"
            )
        return size, head

    def _big_start(self, data: bytes | memoryview) -> _Big | None:
        """A ``_Big`` holding ``data``, the start of a big frame (``None``: not a big one)."""
        if len(data) < 4:
            return None
        size, head = self._length(data, 0)
        if size < BIG_FRAME or len(data) <= head:
            return None
        buffer = self._buffer_for(size)
        have = len(data) - head
        buffer[:have] = memoryview(data)[head:]
        return _Big(buffer, size, have)

    def _buffer_for(self, size: int) -> mmap.mmap:
        """A buffer for a big frame: a spare nothing refers to any more, else a new one.

        New buffers are anonymous private memory: the kernel hands out zeroed pages as
        the read fills them, where ``bytearray(size)`` would zero every page first. A
        decoded object (a numpy array read in place) may keep a buffer alive; a spare
        is reused only when its reference count shows that nothing but this reader holds
        it. The last buffers are kept, ``SPARE_MAX`` bytes of them in all (several, so
        that frames read ahead of their decoding, a stream's items, reuse them too; a
        new page costs a fault, and a stream of 1 MiB items took 330 of them an item).
        A buffer over ``SPARE_MAX`` is never kept, so a huge reply leaves nothing
        behind once its objects are gone.
        """
        spares = self._spares
        for index in range(len(spares)):
            if len(spares[index]) >= size and _holders(self, index) == _FREE:
                return spares[index]
        try:
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        except (OSError, OverflowError, MemoryError) as exc:
            raise FrameTooLargeError(f"frame of {size} bytes cannot be allocated: {exc}") from exc
        if size <= SPARE_MAX:
            while spares and sum(map(len, spares)) + size > SPARE_MAX:
                del spares[0]  # the oldest goes (whoever still holds it keeps it alive)
            spares.append(buffer)
        return buffer

    # -- for tests and simple callers ------------------------------------------

    def feed(self, data: bytes) -> list[Body]:
        """Take bytes read from the stream; return the frame bodies now complete."""
        self.chunks.append(data)
        return self._take()

    def filled(self, count: int) -> list[Body]:
        """``count`` bytes were read into ``read_target()``; return the frames now complete."""
        self.target_counts().append(count)
        return self._take()

    def _take(self) -> list[Body]:
        self.cut()
        frames = list(self.ready)
        self.ready.clear()
        return frames

    @property
    def idle(self) -> bool:
        """No partial frame is buffered."""
        return not self.chunks


def _holders(reader: FrameReader, index: int) -> int:
    """The reference count of one of the reader's spares, always taken the same way.

    How many references the count includes (the list, a local name, the
    argument) is the interpreter's business and differs between versions, so
    it is compared with ``_FREE``, taken the same way from a spare nothing else holds.
    """
    spare = reader._spares[index]
    return sys.getrefcount(spare)


def _free_holders() -> int:
    reader = FrameReader()
    reader._spares.append(mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE))
    return _holders(reader, 0)


#: What ``_holders`` reads for a spare held by its reader alone.
_FREE = _free_holders()
