"""Streams on the client side: the iterator a generator method returns, sync and async.

A stream is one call that gets many replies: ``Items`` frames, then the call's
``Return`` (the end) or ``Raise``. Its ``StreamCall`` waits in the pending table
like any call, and takes each frame of items as it comes (a frame handed out
twice after an interrupt is recognised by its sequence number). Its waiters see
``done`` whenever there is something to take; the consumer clears it when it
has taken everything. The iterator takes a frame whole, credits it back to the
server as it takes it (see ``_streams`` for the window), and hands its items out
from a plain iterator over them (in C).
Closing the iterator early, or dropping it, cancels the stream: the server
closes the generator, and anything still on its way is dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from ._connection import Connection
from ._errors import CallTimeoutError, ProtocolError
from ._messages import Cancel, Credit
from ._pending import PendingCall
from ._streams import WINDOW_ITEMS

T = TypeVar("T")

#: ``next()``'s default: the frame being handed out has run out.
_NONE = object()

#: Credit is sent once this many frames have been taken (and when a wait begins).
_CREDIT_EVERY = 1


class StreamCall(PendingCall):
    """A stream's place in the pending table: items as they come, then its end."""

    __slots__ = ("ended", "frames", "lock", "received", "seq", "taken", "untaken_frames")

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.lock = threading.Lock()
        self.frames: deque[deque[Any]] = deque()  # items not yet taken, frame by frame
        self.seq = 0
        self.received = 0  # items that came
        self.taken = 0  # items the consumer took
        self.untaken_frames = 0  # frames fully taken and not yet credited
        self.ended = False

    def feed(self, seq: int, items: list[Any]) -> None:
        """Take one ``Items`` frame (a repeat of one already taken is ignored).

        Raises:
            ProtocolError: the server sent more than the window allows.
        """
        with self.lock:
            if seq <= self.seq or self.ended:
                return
            if seq != self.seq + 1:
                raise ProtocolError(f"stream frame {seq} came after frame {self.seq}")
            if self.received + len(items) - self.taken > WINDOW_ITEMS:
                raise ProtocolError(
                    f"the peer streamed past its window of {WINDOW_ITEMS} items for {self.method}()"
                )
            self.seq = seq
            self.received += len(items)
            if items:
                self.frames.append(deque(items))
            self.done = True
        waiter = self.waiter
        if waiter is not None:
            waiter.wake()

    def settle(self, ok: bool, value: Any) -> None:
        """The stream ended: ``Return`` (``ok``) or an error."""
        with self.lock:
            if not self.ended:
                self.ended = True
                self.ok = ok
                self.value = value
            self.done = True
        waiter = self.waiter
        if waiter is not None:
            waiter.wake()

    def take_frame(self) -> deque[Any] | None:
        """The next frame's items, whole, or ``None`` when nothing is there right now.
        The frame is counted as taken (and due for credit) as it leaves: an interrupt
        before its items are handed out loses them, never the window's room."""
        with self.lock:
            if not self.frames:
                if not self.ended:
                    self.done = False  # the next feed wakes the consumer
                return None
            # Counted first: a signal handler may run as any C call returns, lock or
            # not, and from the count to the pop there is none but the pop.
            self.taken += len(self.frames[0])
            self.untaken_frames += 1
            return self.frames.popleft()

    def credit_due(self, force: bool = False) -> int:
        """Frames to credit now (at least ``_CREDIT_EVERY``, or any with ``force``)."""
        with self.lock:
            due = self.untaken_frames
            if due and (force or due >= _CREDIT_EVERY):
                self.untaken_frames = 0
                return due
            return 0

    def finish(self) -> None:
        """Raise the end: ``StopIteration``'s stand-in is the caller's business."""
        if not self.ok:
            raise self.value


class _StreamBase:
    """What the sync and async iterators share: the call, its credit, its end."""

    def __init__(
        self,
        core: Connection,
        call: StreamCall,
        call_id: int,
        timeout: float | None,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._core = core
        self._call = call
        self._call_id = call_id
        self._timeout = timeout
        self._on_error = on_error
        self._closed = False
        self._items: Iterator[Any] = iter(())  # the rest of the frame being handed out

    def _take_frame(self) -> Any:
        """The first item of the next frame if it is there (``_NONE`` if not); the
        frame is credited as it is taken."""
        frame = self._call.take_frame()
        if frame is None:
            return _NONE
        self._credit()
        items = self._items = iter(frame)
        return next(items)  # a frame has items

    def _credit(self, force: bool = False) -> None:
        frames = self._call.credit_due(force)
        if frames:
            self._core.control(Credit(self._call_id, frames))

    def close(self) -> None:
        """Stop the stream: the server closes the generator (its ``finally`` runs)."""
        self._items = iter(())
        if self._closed:
            return
        self._closed = True
        if not self._call.ended:
            self._core.abandon(self._call_id)
            self._core.control(Cancel(self._call_id))

    def _end(self) -> None:
        """The stream is over: raise its error the first time (as a generator does)."""
        first = not self._closed
        self._closed = True
        if first:
            if not self._call.ok and self._core.broken is not None:
                self._on_error(self._call.value)  # a ProtocolError kills the child
            self._call.finish()

    def _timed_out(self) -> CallTimeoutError:
        self.close()
        error = CallTimeoutError(f"{self._call.method}() gave no item within {self._timeout} s")
        self._on_error(error)
        return error

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a dead connection: nothing to cancel
            pass


class RemoteIterator(_StreamBase, Iterator[Any]):
    """The iterator a generator method returns through a proxy.

    It hands out one frame's items from a plain iterator over them, and takes the
    next frame (crediting it) only when that runs out."""

    def __iter__(self) -> RemoteIterator:
        return self

    def __next__(self) -> Any:
        item = next(self._items, _NONE)
        if item is not _NONE:
            return item
        return self._next_frame()

    def _next_frame(self) -> Any:
        """The first item of the next frame, once it comes (or the stream's end)."""
        if self._closed:  # closed by the consumer: nothing more, as with a generator
            raise StopIteration
        call = self._call
        while True:
            item = self._take_frame()
            if item is not _NONE:
                return item
            if call.ended or self._closed:
                self._end()
                raise StopIteration
            self._credit(force=True)
            deadline = None if self._timeout is None else time.monotonic() + self._timeout
            try:
                self._core.wait_for(call, deadline)
            except BaseException:  # an interrupt while waiting: the stream ends here
                self.close()
                raise
            if not call.settled() and not call.frames:
                if self._core.broken is not None:
                    error = self._core.broken
                    self._on_error(error)
                    raise self._core.fresh_broken()
                raise self._timed_out()

    def send(self, value: None) -> Any:
        """``next()``: a remote generator takes no values (``None`` only)."""
        if value is not None:
            raise TypeError("a remote generator can only be sent None")
        return next(self)

    def throw(self, error: BaseException, *rest: object) -> Any:
        """Close the stream, then raise ``error`` here (it is not sent to the child)."""
        self.close()
        raise error

    def __enter__(self) -> RemoteIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemoteAsyncIterator(_StreamBase, AsyncIterator[Any]):
    """The async iterator ``astream`` and async generator methods return."""

    def __aiter__(self) -> RemoteAsyncIterator:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        from ._aio import wait_async

        item = next(self._items, _NONE)
        if item is not _NONE:
            return item
        if self._closed:
            raise StopAsyncIteration
        call = self._call
        while True:
            item = self._take_frame()
            if item is not _NONE:
                return item
            if call.ended or self._closed:
                self._end()
                raise StopAsyncIteration
            self._credit(force=True)
            try:
                if self._timeout is None:
                    await wait_async(self._core, call)
                else:
                    async with asyncio.timeout(self._timeout):
                        await wait_async(self._core, call)
            except TimeoutError:
                raise self._timed_out() from None
            except BaseException:  # a cancellation: the stream ends here
                self.close()
                raise

    async def aclose(self) -> None:
        self.close()
