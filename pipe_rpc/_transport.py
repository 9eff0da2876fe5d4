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

Interrupts. An exception raised by a signal handler may land as soon as any C
call returns, in the main thread, where handlers run. So that it can never cut
a frame or lose bytes, on a *guarded* transport (one the main thread may use)
every count and every byte that crosses the kernel boundary is recorded inside
the same C call that moves it: ``list.extend(map(os.read, ...))``, or, for a
read with nothing buffered before it (the one read of most calls), a
``defaultdict`` whose factory reads (``taken[0]`` reads and stores the bytes in
one C call, and costs little more than a plain ``os.read``). A transport only
other threads use (a side channel), or whose loop an interrupt ends anyway (a
server's), is not guarded. Every write records the frame it is writing before
its first byte goes, except one that goes whole or not at all (on Linux, a
frame of up to 1 KiB), which an interrupt cannot cut. A frame whose writer was
interrupted is finished by the next write on the transport (or dropped, if
none of it went), so the stream stays framed. The descriptor's mode is fixed: non-blocking.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import os
import select
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ._wire import LENGTH, Body, Buffer, FrameReader

_READ_SIZE = 1 << 16
_READ_ARGS = (_READ_SIZE,)  # ``map``'s argument, made once
_TAKEN = (0,)  # ``map``'s argument: the one key of ``Transport._taken``
#: On Linux a write of at most ``_SMALL_WRITE`` bytes to a Unix stream socket (one
#: buffer of the kernel's; the smallest send buffer holds two) or to a pipe (at most
#: ``PIPE_BUF``) goes whole or not at all, so an interrupt cannot leave it half sent.
_WHOLE_SMALL_WRITES = sys.platform == "linux"
_SMALL_WRITE = 1024
#: Segments in one ``writev`` (the system's bound is 1024; more gains nothing).
_IOV_MAX = 64
_IN = select.POLLIN | select.POLLPRI
_BAD = select.POLLERR | select.POLLNVAL
_SOCKET_BUFFER = 1 << 22
#: Room for this many descriptors in one ``recvmsg``.
_MAX_FDS = 16
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


_clock = time.perf_counter_ns


def _peer_gone(exc: OSError) -> PeerGone:
    """The ``PeerGone`` a failed read means; ``exc`` itself, raised again, if the peer
    is not gone."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError) or exc.errno in (
        errno.EBADF,
        errno.ENOTCONN,
    ):
        return PeerGone(str(exc))
    raise exc


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


#: After a reply that came too late to spin for, one wait in this many spins again.
_PROBE_EVERY = 8


class _SpinState(Protocol):
    _spin_ns: int
    _spin_next: bool
    _late: int


def _after_sleep(owner: _SpinState, sent_ns: int) -> None:
    """A wait slept and frames came: spin before the next wait if they came within the
    spin window of the last write. A wait that slept measures the wake-up too, so a
    reply that came late once would end spinning for good: after one, every
    ``_PROBE_EVERY``-th wait spins anyway, and a reply caught by that spin resumes it."""
    if time.perf_counter_ns() - sent_ns < owner._spin_ns:
        owner._spin_next = True
        owner._late = 0
    else:
        owner._late += 1
        owner._spin_next = owner._late % _PROBE_EVERY == 0


class PeerGone(Exception):
    """End of file or a reset on the pipe, or the peer's sentinel fired."""


class WriteTimeout(Exception):
    """The deadline passed before a frame was written; what is left of it stays queued."""


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


#: The longest single wait: a longer deadline is waited for in steps (poll takes milliseconds
#: in a C int, and lock waits have ``threading.TIMEOUT_MAX``).
LONGEST_WAIT = 86400.0


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (``None``: no deadline), never negative, at most
    ``LONGEST_WAIT``."""
    if deadline is None:
        return None
    return min(LONGEST_WAIT, max(0.0, deadline - time.monotonic()))


class Poller:
    """Waits on several transports at once: a server's pipe and its side channels.

    It spins before it sleeps as ``Transport.read`` does, and on the same terms.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, Transport] = {}
        self._spin_ns = int(SPIN_SECONDS * 1e9)
        self._spin_next = False
        self._late = 0

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
                _after_sleep(self, max(t._sent_ns for t in self._by_fd.values()))
        return [self._by_fd[fd] for fd, _ in events]


class _Writer:
    """The writing half of ``Transport``: whole frames, finished by the next writer if
    one was interrupted or timed out (see "Interrupts" above)."""

    def __init__(self, fd: int, sentinel: int | None, guarded: bool) -> None:
        self.fd = fd
        self.sentinel = sentinel
        self.guarded = guarded
        self._fd_arg = (fd,)  # ``map``'s argument, made once
        self._sent_ns = 0  # when the last frame was written
        # The frame being written (its segments), and what each write of it took.
        self._out: Sequence[Buffer] | None = None
        self._counts: list[int] = []

    def write(
        self, segments: Sequence[Buffer], deadline: float | None = None, fds: Sequence[int] = ()
    ) -> None:
        """Write one or more frames whole; ``fds`` go with the first byte (``SCM_RIGHTS``).

        A frame left by an earlier writer that was interrupted or timed out is
        finished first (or dropped, if none of it was written).

        Raises:
            PeerGone: the peer closed its end.
            WriteTimeout: the deadline passed; the unwritten rest stays queued, and
                if none of ``segments`` went, they are dropped by the next write.
        """
        if self._out is not None:  # left by a writer that is gone
            self.drop_unstarted()
            self.flush(deadline)
        self._sent_ns = _clock()
        if len(segments) == 1 and not fds:  # the hot path: a joined frame, most often whole
            data = segments[0]
            if self.guarded and not (
                _WHOLE_SMALL_WRITES and len(data) <= _SMALL_WRITE  # type: ignore[arg-type]
            ):
                counts: list[int] = []
                self._counts = counts
                self._out = segments  # before the first byte: an interrupt leaves it queued
                try:
                    counts.extend(map(os.write, self._fd_arg, (data,)))
                    if counts[0] == len(data):  # type: ignore[arg-type]  # joined bytes
                        self._out = None
                        return
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise PeerGone(str(exc)) from exc
            else:  # no signal handler runs here, or the write goes whole or not at all
                try:
                    written = os.write(self.fd, data)
                except BlockingIOError:
                    written = 0
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise PeerGone(str(exc)) from exc
                if written == len(data):  # type: ignore[arg-type]  # joined bytes
                    return
                self._counts = [written]
                self._out = segments
            self._finish(deadline)
            return
        self._counts = []
        self._out = segments  # before the first byte: an interrupt now leaves it queued
        if fds:
            self._send_fds(segments[0], fds, deadline)
        self._finish(deadline)

    @property
    def unsent(self) -> bool:
        """A frame is partly written (its writer was interrupted or timed out)."""
        return self._out is not None

    def flush(self, deadline: float | None) -> None:
        """Finish a frame an earlier writer left (see ``write``)."""
        if self._out is not None:
            self._finish(deadline)

    def _finish(self, deadline: float | None) -> None:
        """Write the rest of ``_out``."""
        segments = self._out
        assert segments is not None
        counts = self._counts
        cursor = _Cursor()
        while True:
            views = cursor.rest(segments, sum(counts))
            if not views:
                self._out = None
                return
            try:
                counts.extend(map(os.writev, self._fd_arg, (views,)))
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise PeerGone(str(exc)) from exc
            self._wait_writable(deadline)

    def unsent_untouched(self) -> bool:
        """A frame is queued and none of it has been written."""
        return self._out is not None and not sum(self._counts)

    def drop_unstarted(self) -> None:
        """Forget a queued frame none of whose bytes were written."""
        if self._out is not None and not sum(self._counts):
            self._out = None

    def _send_fds(self, first: Buffer, fds: Sequence[int], deadline: float | None) -> None:
        """Send the start of ``first`` with ``fds`` attached; its count goes to ``_counts``."""
        sock = socket.socket(fileno=self.fd)  # borrowed: detached below, never closed
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            while True:
                try:
                    self._counts.extend(
                        map(sock.sendmsg, ([memoryview(first).cast("B")],), (rights,))
                    )
                    return
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


class Transport(_Writer):
    """Frames over one non-blocking descriptor, with deadlines and a peer sentinel.

    Args:
        conn: one end of a duplex ``multiprocessing.Pipe``, or a side channel's socket.
        sentinel: a descriptor that becomes readable when the peer process ends.
        max_frame: refuse frames longer than this (``ProtocolError``).
        guarded: False only for a transport the main thread never uses, or whose
            loop an interrupt ends anyway (see "Interrupts" above).

    Frames read wait in ``ready`` for their owner. While ``fds`` is a list,
    reads keep the descriptors passed with the bytes (``SCM_RIGHTS``) and append
    them to it; otherwise the kernel drops them.
    """

    def __init__(
        self,
        conn: HasFileno,
        *,
        sentinel: int | None = None,
        max_frame: int | None = None,
        guarded: bool = True,
    ) -> None:
        super().__init__(conn.fileno(), sentinel, guarded)
        self._readable = [(self.fd, select.POLLIN)]  # what ``poll`` says of a readable pipe
        self.fds: list[int] | None = None
        self.fds_lost = False  # descriptors came that did not fit (MSG_CTRUNC)
        self.reader = FrameReader(max_frame)
        self.ready = self.reader.ready
        #: A guarded read's bytes, until they are handed out or moved to the reader:
        #: ``taken[0]`` reads them and stores them in one C call.
        self._taken: defaultdict[int, bytes] = defaultdict(
            functools.partial(os.read, self.fd, _READ_SIZE)
        )
        self._spin_ns = int(SPIN_SECONDS * 1e9)
        self._spin_next = False  # did the last answer come within the spin window?
        self._late = 0  # answers in a row that came too late
        os.set_blocking(self.fd, False)
        self._poll = select.poll()
        self._poll.register(self.fd, _IN)
        if sentinel is not None:
            self._poll.register(sentinel, _IN)

    def read(self, timeout: float | None, spin: bool = True) -> None:
        """Wait up to ``timeout`` seconds (``None``: no bound) and add the frames that
        came to ``ready`` (none: the time ran out, or only part of a frame came).

        Raises:
            PeerGone: end of file, a reset, or the peer's sentinel fired with nothing
                left to read (frames that came before it are in ``ready``).
            ProtocolError: the stream broke the framing.
        """
        reader = self.reader
        if reader.chunks or self._taken:  # an interrupted reader may have left a whole frame
            if self._taken:
                self._take_over()
            before = len(self.ready)
            reader.cut()
            if len(self.ready) > before:
                return
        if spin and self._spin_next and self._spin(timeout):
            return
        events = self._poll.poll(None if timeout is None else timeout * 1000)
        if not events:
            return
        if len(events) == 1 and events[0] == (self.fd, select.POLLIN):  # the common case
            self.read_available()
            if self._spin_ns:
                _after_sleep(self, self._sent_ns)
            return
        readable = False
        for fd, mask in events:
            if fd == self.fd:
                if mask & _BAD and not mask & _IN:
                    raise PeerGone(f"pipe descriptor reported poll events {mask:#x}")
                readable = True
        before = len(self.ready)
        self.read_available()
        if not readable and len(self.ready) == before:
            # The sentinel fired, and the peer wrote nothing more before it died.
            raise PeerGone("peer process ended")

    def spin(self) -> bool:
        """Spin for frames as ``read`` does before it sleeps, and never sleep: True if
        frames came. Nothing is tried while the last reply came late (see ``note_reply``)."""
        return self._spin_next and self._spin(None)

    def note_reply(self) -> None:
        """Frames came without ``read``: spin again next time if they came within the window."""
        if self._spin_ns:
            _after_sleep(self, self._sent_ns)

    def _spin(self, timeout: float | None) -> bool:
        """Poll without waiting for up to the spin window (and ``timeout``), and read once
        the descriptor is readable; True if that read took frames or found the sentinel.
        A poll that finds nothing costs a quarter of a read that finds nothing (which
        raises), so the spinner sees a reply sooner."""
        clock = _clock
        spin = self._spin_ns if timeout is None else min(self._spin_ns, int(timeout * 1e9))
        end = clock() + spin
        poll = self._poll.poll
        readable = self._readable
        while True:
            events = poll(0)
            if events:
                if events != readable:  # the sentinel too: read() sorts it out
                    return False
                before = len(self.ready)
                self.read_available()
                if len(self.ready) > before:
                    return True
            _give_way()
            if clock() >= end:
                self._spin_next = False
                return False

    def read_available(self) -> None:
        """Read what is there without waiting and cut it into ``ready``.

        Raises:
            PeerGone: end of file (frames that came before it are in ``ready``).
        """
        reader = self.reader
        chunks = reader.chunks
        taken = self._taken
        if taken:
            self._take_over()
        if chunks or self.fds is not None:
            if chunks:
                reader.cut()  # what an interrupted reader read and did not cut
            self._read_more()
            return
        try:  # the hot path: one read, most often one frame
            # Guarded, the bytes are kept in ``taken`` until they are handed out.
            data = taken[0] if self.guarded else os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            raise _peer_gone(exc) from exc
        got = len(data)
        if 4 < got < _READ_SIZE:
            (size,) = LENGTH.unpack_from(data)
            if size == got - 4 and (reader.max_frame is None or size <= reader.max_frame):
                self.ready.append(memoryview(data)[4:])
                if taken:
                    # An interrupt before this leaves the frame to be cut again: a
                    # repeat, which the protocol drops as a late reply.
                    del taken[0]
                return
        if not got:
            taken.clear()
            raise PeerGone("end of file")
        if taken:
            self._take_over()
        else:
            chunks.append(data)
        reader.cut()
        if got == _READ_SIZE or (chunks and reader.read_target() is not None):
            self._read_more()  # else a short read: nothing more is there now

    def _take_over(self) -> None:
        """Move the bytes ``_taken`` holds (it must hold some) to the reader, ahead of
        any read after them (one C call: an interrupt finds them in one place or the
        other, never both)."""
        self.reader.chunks.extend(map(self._taken.pop, _TAKEN))

    def _read_more(self) -> None:
        """``read_available`` past its first read (or with ``fds``): read until nothing
        more is there, or until a big frame is whole."""
        reader = self.reader
        chunks = reader.chunks
        fd_arg = self._fd_arg
        while True:
            target = reader.read_target() if chunks else None
            if target is None and self.fds is not None:  # a descriptor may come next
                self._read_keeping_fds()
                return
            try:
                if target is not None:  # a big frame: read it in place
                    counts = reader.target_counts()
                    counts.extend(map(os.readv, fd_arg, ([target],)))
                    got = counts[-1]
                elif self.guarded:
                    chunks.extend(map(os.read, fd_arg, _READ_ARGS))
                    got = len(chunks[-1])  # type: ignore[arg-type]  # bytes just read
                else:
                    data = os.read(self.fd, _READ_SIZE)
                    chunks.append(data)
                    got = len(data)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _peer_gone(exc) from exc
            reader.cut()
            if 0 < got < _READ_SIZE and not chunks:  # the common case: whole frames, all cut
                return
            if not got:
                raise PeerGone("end of file")
            if reader.read_target() is None and (got < _READ_SIZE or target is not None):
                # A short read, or a big frame just completed: it is decoded before more
                # is read, so that its buffer is free again for the next big frame.
                return

    def take(self) -> list[Body]:
        """Take every frame in ``ready`` (for a single-threaded owner: the server)."""
        ready = self.ready
        frames = list(ready)
        ready.clear()
        return frames

    def _read_keeping_fds(self) -> None:
        """``read_available`` with ``recvmsg``: passed descriptors go to ``self.fds``."""
        assert self.fds is not None
        sock = socket.socket(fileno=self.fd)  # borrowed: detached below, never closed
        reader = self.reader
        try:
            while True:
                try:
                    data, ancillary, flags, _ = sock.recvmsg(_READ_SIZE, _FDS_SPACE, _CLOEXEC)
                except BlockingIOError:
                    return
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
                reader.chunks.append(data)
                reader.cut()
                if reader.read_target() is not None:  # a big frame: read it in place
                    self.read_available()
                    return
        finally:
            sock.detach()

    def read_blocking(self) -> list[Body]:
        """Wait with no deadline until at least one whole frame has come; take them."""
        ready = self.ready
        while not ready:
            self.read(None)
        frames = list(ready)  # ``take``, written out: this is every request's path
        ready.clear()
        return frames


class _Cursor:
    """Where a write of many segments stands, so that each ``writev`` starts where the
    last one ended (not from the first segment: a batch of thousands of small replies
    would cost time quadratic in their number)."""

    __slots__ = ("done", "start")

    def __init__(self) -> None:
        self.start = 0  # segments[:start] are written whole ...
        self.done = 0  # ... and hold this many bytes

    def rest(self, segments: Sequence[Buffer], written: int) -> list[memoryview]:
        """Byte views of what is left of ``segments`` once ``written`` bytes went, at
        most ``_IOV_MAX`` of them (none: all went)."""
        skip = written - self.done
        views: list[memoryview] = []
        index = self.start
        while index < len(segments) and len(views) < _IOV_MAX:
            view = memoryview(segments[index]).cast("B")
            index += 1
            if not views and skip >= len(view):  # written whole: never look at it again
                skip -= len(view)
                self.done += len(view)
                self.start = index
                continue
            views.append(view[skip:] if skip else view)
            skip = 0
        return views
