"""The child's standard error: a pipe per child, one thread in the parent that drains them all.

Theory of operation
-------------------

Each child gets a pipe of its own; in the child its write end becomes file
descriptor 2 (so C code writing to fd 2, Python's ``sys.stderr`` and
``faulthandler`` all go there), and ``faulthandler`` is enabled on it.

In the parent one bare thread (``_thread``: ``threading`` would count it in
the warning Python 3.12+ gives when a threaded process forks) polls the read
ends of every child's pipe and a wake-up pipe. It reads what comes, keeps the
last ``TAIL_BYTES`` of each child, and forwards the bytes to the parent's fd 2
as it is at that moment, whole lines at a time: a line written in pieces (as
``faulthandler`` writes) reaches fd 2 in one write, so another process's output
cannot cut it, and a partial line waits until its end (``\n``, or the ``\r`` of
a progress bar) comes, the child dies, or ``LINGER`` seconds pass. The thread
drains whether or not a call is being made, so a child that writes a lot never
blocks on a full pipe; it costs a call nothing. It takes no lock a forked child
could need, and writes with ``os.write``.

The tail is the last ``TAIL_BYTES`` of the stream, from the start of a line,
with one exception. ``faulthandler`` prints a crash's innermost frames first
and the outermost last, and a deep stack (under ``fork`` a child's stack holds
its parent's frames too) can push the report's start out of the tail. So the
start of the first report seen (its "Fatal Python error" line, the two lines
before it, up to ``REPORT_BYTES``) is kept, and when it has scrolled out the
tail is that start, a line ``  ...``, then the stream's last lines.

It is the only reader of the pipes. When a child has died, ``finish()`` asks
the thread to read that child's pipe to its current end and waits for it, up
to a deadline: every byte a dead child wrote is in its pipe already, so the
current end is enough, and a grandchild that holds the write end open cannot
make it wait. A pipe is closed by the thread when it reads its end of file.

A process forked from the parent forgets all of this (``os.register_at_fork``):
it closes its copies of the read ends and starts a thread of its own if it
starts children of its own.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import sys
import time
from multiprocessing.connection import Connection

#: Bytes of a child's standard error kept for ``WorkerDiedError.stderr_tail``.
TAIL_BYTES = 4096
#: Bytes of the start of a crash report that the tail keeps when the report is longer.
REPORT_BYTES = TAIL_BYTES // 2
#: Lines of the tail that a ``WorkerDiedError``'s message shows (and all of a crash report).
MESSAGE_LINES = 20
#: Seconds a partial line waits for its end before it is forwarded as it is.
LINGER = 0.5
#: Seconds ``finish()`` waits for the drain thread.
FINISH_TIMEOUT = 0.25

_CHUNK = 1 << 16
#: Reads that ``finish()`` may take from one pipe: a pipe holds 64 KiB unless
#: its writer enlarged it; a grandchild writing without end cannot hold us.
_FINISH_READS = 32
_FATAL = b"Fatal Python error: "
_ELISION = b"  ...\n"

# Shared with the drain thread without a lock: list appends and pops, set adds
# and discards are atomic. _FDS lists only descriptors that are open (added
# before use, discarded before close), so a forked child may close them all.
_FDS: set[int] = set()
_NEW: list[ChildStderr] = []
_REQUESTS: list[tuple[ChildStderr, _thread.LockType]] = []
_wake: tuple[int, int] | None = None  # the drain thread's wake-up pipe, in the process it runs in
_owner = 0  # the pid the drain thread runs in


class ChildStderr:
    """The parent's end of one child's standard error: what it forwards and the tail it keeps."""

    def __init__(self) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        self.fd = read_end
        #: The child's end, for its process arguments; the parent closes it once the child started.
        self.child_end = Connection(write_end, readable=False)
        self.closed = False  # the drain thread read its end of file and closed it
        self._tail = bytearray()  # the stream's last bytes (TAIL_BYTES + 1, more for a moment)
        self._seen = 0  # bytes read in all: the stream offset of the tail's end
        self._report = bytearray()  # the start of a crash report, if one was seen
        self._report_at = -1  # its stream offset
        self._partial = b""  # the start of a line not yet forwarded
        self._partial_since = 0.0
        _FDS.add(read_end)

    def watch(self) -> None:
        """Hand the pipe to the drain thread (started on first use in this process)."""
        _ensure_drain()
        _NEW.append(self)
        _ring()

    def finish(self, timeout: float = FINISH_TIMEOUT) -> None:
        """Read the pipe to its current end and forward it, waiting up to ``timeout`` s.

        For a child that has ended: everything it wrote is in the pipe by then.
        """
        if self.closed or _owner != os.getpid():
            return
        waiter = _thread.allocate_lock()
        waiter.acquire()
        _REQUESTS.append((self, waiter))
        _ring()
        waiter.acquire(timeout=timeout)

    def tail(self) -> str:
        """The last bytes, at most ``TAIL_BYTES``, decoded, from the start of a line.

        With the start of a crash report in place of the middle, if the report is
        too long to fit (see the module's docstring).
        """
        buf, seen = bytes(self._tail), self._seen
        report, at = bytes(self._report), self._report_at
        base = seen - len(buf)  # the stream offset of buf[0]
        start = max(0, len(buf) - TAIL_BYTES)
        if report and at < base + start:
            if len(report) >= REPORT_BYTES:
                report = report[: report.rfind(b"\n") + 1]
            end = at + len(report)
            start = max(end - base, len(buf) - (TAIL_BYTES - len(report) - len(_ELISION)))
            if start > end - base:
                report += _ELISION
            else:
                return (report + buf[start:]).decode("utf-8", "replace")
            return (report + _from_line_start(buf, start)).decode("utf-8", "replace")
        return _from_line_start(buf, start).decode("utf-8", "replace")

    def last_line(self) -> str:
        """The tail's last line that is not blank, or ``""``."""
        for line in reversed(self.tail().splitlines()):
            if line.strip():
                return line
        return ""

    def death_note(self) -> str:
        """Text for a dead child's error message: the tail's last lines, after ``finish()``."""
        self.finish()
        lines = self.tail().rstrip().splitlines()
        if not lines:
            return ""
        start = max(0, len(lines) - MESSAGE_LINES)
        # A crash's Python stack must be in the message: keep all of faulthandler's report.
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith(_FATAL.decode()):
                start = min(start, max(0, index - 2))
                break
        shown = "\n".join(f"  {line}" for line in lines[start:])
        return f"; its standard error ended with:\n{shown}"

    # -- in the drain thread --------------------------------------------------

    def _pump(self) -> bool:
        """One read: keep, forward whole lines. False at end of file."""
        try:
            data = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._flush_partial()
            return False
        self._keep(data)
        data = self._partial + data if self._partial else data
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if cut:
            _forward(data if cut == len(data) else data[:cut])
            data = data[cut:]
        if len(data) >= _CHUNK:  # a line with no end in sight
            _forward(data)
            data = b""
        if data and not self._partial:
            self._partial_since = time.monotonic()
        self._partial = data
        return True

    def _keep(self, data: bytes) -> None:
        """Add ``data`` to the tail; look for the start of a crash report in it."""
        tail = self._tail
        first = self._seen - len(tail)
        look_from = max(0, len(tail) - len(_FATAL))
        tail += data
        self._seen += len(data)
        if self._report_at < 0:
            at = tail.find(_FATAL, look_from)
            while at > 0 and tail[at - 1] != ord("\n"):
                at = tail.find(_FATAL, at + 1)
            if at >= 0:
                for _ in range(2):  # the lines before it: what C code said before the crash
                    if at > 0:
                        at = tail.rfind(b"\n", 0, at - 1) + 1
                self._report_at = first + at
                self._report[:] = tail[at : at + REPORT_BYTES]
        elif len(self._report) < REPORT_BYTES:
            self._report += data[: REPORT_BYTES - len(self._report)]
        if len(tail) > TAIL_BYTES + 1:  # one more: is the tail's first byte a line's first?
            del tail[: -TAIL_BYTES - 1]

    def _flush_partial(self) -> None:
        if self._partial:
            _forward(self._partial)
            self._partial = b""


def _from_line_start(buf: bytes, start: int) -> bytes:
    """``buf[start:]``, less the part of a line cut by ``start`` (less a cut character if
    the rest is all one line). ``buf[0]`` counts as the start of a line."""
    if start == 0 or buf[start - 1] == ord("\n"):
        return buf[start:]
    newline = buf.find(b"\n", start)
    if 0 <= newline < len(buf) - 1:
        return buf[newline + 1 :]
    return buf[start:].lstrip(bytes(range(0x80, 0xC0)))


def _forward(data: bytes) -> None:
    """Write all of ``data`` to this process's fd 2, whatever it is now."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(2, view)
        except BlockingIOError:  # fd 2 is non-blocking and full: wait as a blocking write would
            poll = select.poll()
            poll.register(2, select.POLLOUT)
            poll.poll()
            continue
        except OSError:  # fd 2 is closed or broken; the tail keeps what it can
            return
        view = view[written:]


def _ring() -> None:
    wake = _wake
    if wake is not None:
        with contextlib.suppress(OSError):  # full: the thread is woken already
            os.write(wake[1], b"\0")


def _ensure_drain() -> None:
    global _wake, _owner
    pid = os.getpid()
    if _owner == pid:
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    _FDS.add(read_end)
    _FDS.add(write_end)
    _wake = (read_end, write_end)
    _owner = pid
    _thread.start_new_thread(_drain, (read_end,))


def _drain(wake: int) -> None:
    """The drain thread: poll every child's pipe; adopt new ones; serve ``finish()``."""
    poll = select.poll()
    poll.register(wake, select.POLLIN)
    sinks: dict[int, ChildStderr] = {}
    while True:
        lingering = [sink for sink in sinks.values() if sink._partial]
        timeout = None
        if lingering:
            oldest = min(sink._partial_since for sink in lingering)
            timeout = max(0, int((oldest + LINGER - time.monotonic()) * 1000) + 1)
        for fd, _ in poll.poll(timeout):
            if fd == wake:
                with contextlib.suppress(OSError):
                    os.read(wake, 4096)
            elif fd in sinks and not sinks[fd]._pump():
                _retire(sinks.pop(fd), poll)
        _adopt(sinks, poll)
        while _REQUESTS:
            sink, waiter = _REQUESTS.pop(0)
            _adopt(sinks, poll)  # a pipe handed over since the last look
            if sinks.get(sink.fd) is sink:
                _read_to_current_end(sink, sinks, poll)
            waiter.release()
        now = time.monotonic()
        for sink in lingering:
            if sink._partial and now - sink._partial_since >= LINGER:
                sink._flush_partial()


def _adopt(sinks: dict[int, ChildStderr], poll: select.poll) -> None:
    while _NEW:
        sink = _NEW.pop()
        sinks[sink.fd] = sink
        poll.register(sink.fd, select.POLLIN)


def _read_to_current_end(
    sink: ChildStderr, sinks: dict[int, ChildStderr], poll: select.poll
) -> None:
    check = select.poll()
    check.register(sink.fd, select.POLLIN)
    for _ in range(_FINISH_READS):
        if not check.poll(0):
            break
        if not sink._pump():
            _retire(sinks.pop(sink.fd), poll)
            return
    sink._flush_partial()


def _retire(sink: ChildStderr, poll: select.poll) -> None:
    poll.unregister(sink.fd)
    sink.closed = True
    _FDS.discard(sink.fd)
    os.close(sink.fd)


def _forget_after_fork() -> None:
    """In a forked child: the pipes and the thread are the parent's; close our copies."""
    global _wake, _owner
    for fd in list(_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _FDS.clear()
    _NEW.clear()
    _REQUESTS.clear()
    _wake = None
    _owner = 0


os.register_at_fork(after_in_child=_forget_after_fork)


def adopt_in_child(end: Connection) -> None:
    """In the child: make ``end`` its fd 2 and ``sys.stderr``, and enable ``faulthandler`` on it."""
    os.dup2(end.fileno(), 2)
    end.close()
    try:
        on_fd_2 = sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by an object with no descriptor
        on_fd_2 = False
    if not on_fd_2:  # under fork, whatever the parent had put there
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    import faulthandler

    faulthandler.enable(2)
