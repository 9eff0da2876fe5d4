"""Thin I/O around a Connection's file descriptor: write frames, read frames with a deadline.

The descriptor of a duplex ``multiprocessing.Pipe`` is one end of a socket
pair. It is read and written here directly (``os.read``/``os.readv``/
``os.writev``), framed exactly as ``Connection.send_bytes`` frames, so that
several replies can be taken in one read and large frames are read in place.
The descriptor is non-blocking: every wait is a ``poll`` that also watches
the peer process's sentinel and never outlives the caller's deadline.

Before it sleeps in ``poll``, a reader *spins* for up to ``SPIN_SECONDS``,
trying non-blocking reads: when the peer answers within microseconds, as a
small call's reply or a tight loop's next call does, this saves the cost of
putting the process to sleep and waking it again, which is most of a small
call's round trip. The spin is adaptive: it is tried only when the previous
answer came within the window, so an end waiting on slow calls or an idle
peer sleeps at once. It is off when the process may run on only one CPU (the
spinner would hold the CPU the peer needs) or when the ``PIPE_RPC_SPIN_US``
environment variable is ``0``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

from ._codec import Body, Buffer
from ._protocol import FrameReader

_READ_SIZE = 1 << 16
_IN = select.POLLIN | select.POLLPRI
_BAD = select.POLLERR | select.POLLNVAL
_SOCKET_BUFFER = 1 << 22


def _spin_seconds() -> float:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return 0.0
    try:
        return max(0.0, float(os.environ.get("PIPE_RPC_SPIN_US", "100")) / 1e6)
    except ValueError:
        return 100e-6


#: How long a reader tries non-blocking reads before it sleeps in ``poll`` (0: never).
SPIN_SECONDS = _spin_seconds()


class PeerGone(Exception):
    """End of file or a reset on the pipe, or the peer's sentinel fired."""


class WriteTimeout(Exception):
    """The deadline passed while a frame was half written; the stream is no longer framed."""


def enlarge_buffers(conn: Connection) -> None:
    """Ask for larger socket buffers (fewer wake-ups for big payloads); harmless if refused."""
    try:
        sock = socket.socket(fileno=conn.fileno())  # borrowed: detached below, never closed
    except OSError:
        return
    try:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:
                pass
    finally:
        sock.detach()


def shutdown(conn: Connection) -> None:
    """Shut the socket down both ways: wakes a thread polling it and tells the peer."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (``None``: no deadline), never negative."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Transport:
    """Frames over one descriptor, with deadlines and a peer sentinel.

    Args:
        conn: one end of a duplex ``multiprocessing.Pipe``.
        sentinel: a descriptor that becomes readable when the peer process ends.
        max_frame: refuse frames longer than this (``ProtocolError``).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        sentinel: int | None = None,
        max_frame: int | None = None,
    ) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.reader = FrameReader(max_frame)
        self.sentinel = sentinel
        self._spin_ns = int(SPIN_SECONDS * 1e9)
        self._spin_next = False  # did the last answer come within the spin window?
        self._sent_ns = 0  # when the last frame was written
        os.set_blocking(self.fd, False)
        self._poll = select.poll()
        self._poll.register(self.fd, _IN)
        if sentinel is not None:
            self._poll.register(sentinel, _IN)

    def write(self, segments: Sequence[Buffer], deadline: float | None = None) -> None:
        """Write one or more frames whole.

        Raises:
            PeerGone: the peer closed its end.
            WriteTimeout: the deadline passed after part of a frame was written.
        """
        fd = self.fd
        self._sent_ns = time.perf_counter_ns()
        if len(segments) == 1:
            data = segments[0]
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                written = 0
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise PeerGone(str(exc)) from exc
            if written == len(data):  # type: ignore[arg-type]  # a single segment is joined bytes
                return
        else:
            written = 0
        self._write_rest(segments, written, deadline)

    def _write_rest(self, segments: Sequence[Buffer], skip: int, deadline: float | None) -> None:
        views = [memoryview(s).cast("B") for s in segments]
        while views:
            while views and skip >= len(views[0]):
                skip -= len(views[0])
                views.pop(0)
            if not views:
                return
            views[0] = views[0][skip:]
            skip = 0
            try:
                skip = os.writev(self.fd, views[:64])
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise PeerGone(str(exc)) from exc
            self._wait_writable(deadline)

    def _wait_writable(self, deadline: float | None) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        if self.sentinel is not None:
            poll.register(self.sentinel, _IN)
        left = remaining(deadline)
        events = poll.poll(None if left is None else left * 1000)
        if not events and left is not None:
            raise WriteTimeout("deadline passed while writing")
        for fd, _ in events:
            if fd == self.sentinel:
                raise PeerGone("peer process ended")

    def read(self, timeout: float | None, spin: bool = True) -> list[Body]:
        """Wait up to ``timeout`` seconds (``None``: no bound) and return the frames that came.

        An empty list means the time ran out or only part of a frame came.

        Raises:
            PeerGone: end of file, a reset, or the peer's sentinel fired with nothing left to read.
            ProtocolError: the stream broke the framing.
        """
        if spin and self._spin_next:
            frames = self._spin(timeout)
            if frames:
                return frames
        events = self._poll.poll(None if timeout is None else timeout * 1000)
        if not events:
            return []
        if len(events) == 1 and events[0] == (self.fd, select.POLLIN):  # the common case
            frames = self.read_available()
            if self._spin_ns:
                self._spin_next = time.perf_counter_ns() - self._sent_ns < self._spin_ns
            return frames
        readable = False
        for fd, mask in events:
            if fd == self.fd:
                if mask & _BAD and not mask & _IN:
                    raise PeerGone(f"pipe descriptor reported poll events {mask:#x}")
                readable = True
        if not readable:
            # The sentinel fired; the peer may still have written a last reply before it died.
            frames = self.read_available()
            if frames:
                return frames
            raise PeerGone("peer process ended")
        return self.read_available()

    def _spin(self, timeout: float | None) -> list[Body]:
        """Try non-blocking reads for up to the spin window (and ``timeout``)."""
        clock = time.perf_counter_ns
        spin = self._spin_ns if timeout is None else min(self._spin_ns, int(timeout * 1e9))
        end = clock() + spin
        read = self.read_available
        while True:
            frames = read()
            if frames:
                return frames
            if clock() >= end:
                self._spin_next = False
                return frames

    def read_available(self) -> list[Body]:
        """Read what is there without waiting; raise PeerGone at end of file."""
        reader = self.reader
        fd = self.fd
        if reader.idle:  # the common case: one small read
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return []
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerGone(str(exc)) from exc
            if not data:
                raise PeerGone("end of file")
            if len(data) < _READ_SIZE:
                frames = reader.feed(data)
                if reader.read_target() is None:
                    return frames
            else:
                frames = reader.feed(data)
        else:
            frames = []
        while True:
            target = reader.read_target()
            try:
                if target is not None:
                    count = os.readv(fd, [target])
                    if count == 0:
                        raise PeerGone("end of file in the middle of a frame")
                    frames.extend(reader.filled(count))
                    continue
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return frames
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerGone(str(exc)) from exc
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTCONN):
                    raise PeerGone(str(exc)) from exc
                raise
            if not data:
                raise PeerGone("end of file")
            frames.extend(reader.feed(data))
            if len(data) < _READ_SIZE and reader.read_target() is None:
                return frames

    def read_blocking(self) -> list[Body]:
        """Wait with no deadline until at least one whole frame has come."""
        while True:
            frames = self.read(None)
            if frames:
                return frames
