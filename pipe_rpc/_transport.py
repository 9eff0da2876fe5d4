"""Thin I/O around a Connection's file descriptor: write frames, read frames with a deadline.

The descriptor of a duplex ``multiprocessing.Pipe`` is one end of a socket
pair. It is read and written here directly (``os.read``/``os.readv``/
``os.writev``), framed exactly as ``Connection.send_bytes`` frames, so that
several replies can be taken in one read and large frames are read in place.
The descriptor is non-blocking: every wait is a ``poll`` that also watches
the peer process's sentinel and never outlives the caller's deadline.

Before it sleeps in ``poll``, a reader *spins* for up to ``SPIN_SECONDS``,
polling without waiting: when the peer answers within microseconds, as a
small call's reply or a tight loop's next call does, this saves the cost of
putting the process to sleep and waking it again, which is most of a small
call's round trip. The spin is adaptive: it is tried only when the previous
answer came within the window, so an end waiting on slow calls or an idle
peer sleeps at once. It is off when the process may run on only one CPU (the
spinner would hold the CPU the peer needs) or when the ``PIPE_RPC_SPIN_US``
environment variable is ``0``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ._codec import Body, Buffer
from ._protocol import FrameReader

_READ_SIZE = 1 << 16
_IN = select.POLLIN | select.POLLPRI
_BAD = select.POLLERR | select.POLLNVAL
_SOCKET_BUFFER = 1 << 22
#: Room for this many descriptors in one ``recvmsg``.
_MAX_FDS = 16
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


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


def _no_yield() -> None:
    pass


#: Between two tries a spinner yields its CPU. When the scheduler has put the peer on
#: the same CPU, the peer then runs at once; without it, each of the peer's turns
#: waited for the end of the spin window (a p99 of 140 us where the median is 24).
_give_way: Callable[[], None] = getattr(os, "sched_yield", _no_yield)


class PeerGone(Exception):
    """End of file or a reset on the pipe, or the peer's sentinel fired."""


class WriteTimeout(Exception):
    """The deadline passed while a frame was half written; the stream is no longer framed."""


class HasFileno(Protocol):
    """A ``Connection`` or a ``socket.socket``."""

    def fileno(self) -> int: ...


@contextlib.contextmanager
def _borrowed(conn: HasFileno | int) -> Iterator[socket.socket | None]:
    """The socket on ``conn``'s descriptor (or on ``conn``, a descriptor), detached
    afterwards, never closed (``None``: not a socket, or already closed)."""
    try:
        sock = socket.socket(fileno=conn if isinstance(conn, int) else conn.fileno())
    except (OSError, ValueError):
        yield None
        return
    try:
        yield sock
    finally:
        sock.detach()


def is_unix_stream(conn: HasFileno | int) -> bool:
    """Is ``conn`` a Unix stream socket (one that can pass descriptors)?"""
    with _borrowed(conn) as sock:
        return sock is not None and (sock.family, sock.type) == (socket.AF_UNIX, socket.SOCK_STREAM)


def enlarge_buffers(conn: HasFileno) -> None:
    """Ask for larger socket buffers (fewer wake-ups for big payloads); harmless if refused."""
    with _borrowed(conn) as sock:
        if sock is None:
            return
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def shutdown(conn: HasFileno) -> None:
    """Shut the socket down both ways: wakes a thread polling it and tells the peer."""
    with _borrowed(conn) as sock, contextlib.suppress(OSError):
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (``None``: no deadline), never negative."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Poller:
    """Waits on several transports at once: a server's pipe and its side channels.

    It spins before it sleeps as ``Transport.read`` does, and on the same terms.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, Transport] = {}
        self._spin_ns = int(SPIN_SECONDS * 1e9)
        self._spin_next = False

    def add(self, transport: Transport) -> None:
        self._by_fd[transport.fd] = transport
        self._poll.register(transport.fd, _IN)

    def remove(self, transport: Transport) -> None:
        if self._by_fd.pop(transport.fd, None) is not None:
            self._poll.unregister(transport.fd)

    def wait(self) -> list[Transport]:
        """Wait with no deadline until some transports are readable (or at end of file)."""
        poll = self._poll.poll
        events: list[tuple[int, int]] = []
        if self._spin_next:
            clock = time.perf_counter_ns
            end = clock() + self._spin_ns
            while True:
                events = poll(0)
                if events or clock() >= end:
                    break
                _give_way()
        if not events:
            events = poll()
            if self._spin_ns:
                sent = max(t._sent_ns for t in self._by_fd.values())
                self._spin_next = time.perf_counter_ns() - sent < self._spin_ns
        return [self._by_fd[fd] for fd, _ in events]


class Transport:
    """Frames over one descriptor, with deadlines and a peer sentinel.

    Args:
        conn: one end of a duplex ``multiprocessing.Pipe``, or a side channel's socket.
        sentinel: a descriptor that becomes readable when the peer process ends.
        max_frame: refuse frames longer than this (``ProtocolError``).

    While ``fds`` is a list, reads keep the descriptors passed with the bytes
    (``SCM_RIGHTS``) and append them to it; otherwise the kernel drops them.
    """

    def __init__(
        self,
        conn: HasFileno,
        *,
        sentinel: int | None = None,
        max_frame: int | None = None,
    ) -> None:
        self.fd = conn.fileno()
        self.blocking = False
        self.fds: list[int] | None = None
        self.fds_lost = False  # descriptors came that did not fit (MSG_CTRUNC)
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

    def write(
        self, segments: Sequence[Buffer], deadline: float | None = None, fds: Sequence[int] = ()
    ) -> None:
        """Write one or more frames whole; ``fds`` go with the first byte (``SCM_RIGHTS``).

        Raises:
            PeerGone: the peer closed its end.
            WriteTimeout: the deadline passed after part of a frame was written.
        """
        fd = self.fd
        self._sent_ns = time.perf_counter_ns()
        if fds:
            self._write_rest(segments, self._send_fds(segments, fds, deadline), deadline)
            return
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

    def _send_fds(
        self, segments: Sequence[Buffer], fds: Sequence[int], deadline: float | None
    ) -> int:
        """Send the start of ``segments`` with ``fds`` attached; return how many bytes went."""
        sock = socket.socket(fileno=self.fd)  # borrowed: detached below, never closed
        try:
            while True:
                try:
                    return sock.sendmsg(
                        [memoryview(segments[0]).cast("B")],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    )
                except BlockingIOError:
                    self._wait_writable(deadline)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise PeerGone(str(exc)) from exc
        finally:
            sock.detach()

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

    def set_blocking(self, blocking: bool) -> None:
        """Switch the descriptor's mode (a system call only when it changes).

        In blocking mode ``read(None)`` sleeps in ``read`` itself, one system call
        where a poll and a read are two, but it does not watch the sentinel: the
        caller must make sure the peer's death ends the wait (``shutdown``).
        """
        if blocking != self.blocking:
            os.set_blocking(self.fd, blocking)
            self.blocking = blocking

    def read(self, timeout: float | None, spin: bool = True) -> list[Body]:
        """Wait up to ``timeout`` seconds (``None``: no bound) and return the frames that came.

        An empty list means the time ran out or only part of a frame came.

        Raises:
            PeerGone: end of file, a reset, or the peer's sentinel fired with nothing left to read.
            ProtocolError: the stream broke the framing.
        """
        if self.blocking and timeout is None:
            return self.read_wait()
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
        """Poll without waiting for up to the spin window (and ``timeout``), and read once
        the descriptor is readable. A poll that finds nothing costs a quarter of a read
        that finds nothing (which raises), so the spinner sees a reply sooner."""
        clock = time.perf_counter_ns
        spin = self._spin_ns if timeout is None else min(self._spin_ns, int(timeout * 1e9))
        end = clock() + spin
        poll = self._poll.poll
        ready = [(self.fd, select.POLLIN)]
        while True:
            events = poll(0)
            if events:
                frames = self.read_available()
                if frames or events != ready:  # the sentinel too: read() sorts it out
                    return frames
            _give_way()
            if clock() >= end:
                self._spin_next = False
                return []

    def read_available(self) -> list[Body]:
        """Read what is there without waiting; raise PeerGone at end of file."""
        reader = self.reader
        fd = self.fd
        if reader.idle and self.fds is None:  # the common case: one small read
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
            if target is None and self.fds is not None:  # a descriptor may come next
                frames.extend(self._read_keeping_fds())
                return frames
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

    def read_wait(self) -> list[Body]:
        """Sleep in ``read`` until at least one whole frame has come (blocking mode)."""
        reader = self.reader
        fd = self.fd
        while True:
            target = reader.read_target()
            try:
                if target is not None:  # a big frame: read it in place
                    count = os.readv(fd, [target])
                    if count == 0:
                        raise PeerGone("end of file in the middle of a frame")
                    frames = reader.filled(count)
                else:
                    data = os.read(fd, _READ_SIZE)
                    if not data:
                        raise PeerGone("end of file")
                    frames = reader.feed(data)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerGone(str(exc)) from exc
            if frames:
                return frames

    def _read_keeping_fds(self) -> list[Body]:
        """``read_available`` with ``recvmsg``: passed descriptors go to ``self.fds``."""
        assert self.fds is not None
        sock = socket.socket(fileno=self.fd)  # borrowed: detached below, never closed
        frames: list[Body] = []
        try:
            while True:
                try:
                    data, ancillary, flags, _ = sock.recvmsg(_READ_SIZE, _FDS_SPACE, _CLOEXEC)
                except BlockingIOError:
                    return frames
                except (ConnectionResetError, BrokenPipeError) as exc:
                    raise PeerGone(str(exc)) from exc
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        passed = array.array("i")
                        passed.frombytes(payload[: len(payload) - len(payload) % passed.itemsize])
                        for fd in passed:
                            os.set_inheritable(fd, False)  # where MSG_CMSG_CLOEXEC is missing
                        self.fds.extend(passed)
                if flags & socket.MSG_CTRUNC:
                    self.fds_lost = True
                if not data:
                    raise PeerGone("end of file")
                frames.extend(self.reader.feed(data))
                if self.reader.read_target() is not None:  # a big frame: read it in place
                    frames.extend(self.read_available())
                    return frames
        finally:
            sock.detach()

    def read_blocking(self) -> list[Body]:
        """Wait with no deadline until at least one whole frame has come."""
        while True:
            frames = self.read(None)
            if frames:
                return frames
