"""The child process, from its start to ``serve()``.

The child runs ``child_main``: it leads a process group of its own (so a
kill takes its grandchildren too), closes the parent ends of other servers'
pipes it inherited under ``fork`` (so a sibling's death is never masked),
starts a thread that ends the group if our process dies, applies the
``Limits``, builds the service from the cloudpickled factory and serves it.
A factory that raises sends ``StartupFailed`` instead of the hello. Its
standard error is a pipe that the parent drains (``_stderr``).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import pickle
import select
import signal
import sys
import time
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from ._codec import Codec
from ._liveness import close_inherited_now
from ._messages import StartupFailed
from ._server import serve
from ._stderr import adopt_in_child
from ._transport import Transport

if TYPE_CHECKING:  # imported when used: the child needs attrs only when given limits
    from ._limits import Limits

#: The parent ends of live servers' pipes; a child started by fork closes them all.
PARENT_ENDS: weakref.WeakSet[Connection] = weakref.WeakSet()


def child_main(
    conn: Connection,
    factory_blob: bytes,
    parent_pid: int,
    limits: Limits | None,
    max_concurrency: int,
    untrusted: bool = False,
    allowed_blob: bytes | None = None,
    stderr_end: Connection | None = None,
) -> None:
    """The child process: set up isolation, build the service, serve it."""
    if stderr_end is not None:
        adopt_in_child(stderr_end)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for end in list(PARENT_ENDS):
        if end is not conn:
            end.close()
    close_inherited_now()
    _watch_parent(parent_pid)
    try:
        if limits is not None:
            limits.apply()
        factory = pickle.loads(factory_blob)
        service = factory()
    except BaseException as exc:
        transport = Transport(conn)
        with contextlib.suppress(OSError, Exception):
            transport.write(Codec().encode(StartupFailed(exc)))
        conn.close()
        sys.exit(1)
    allowed_types = () if allowed_blob is None else pickle.loads(allowed_blob)
    serve(
        service,
        conn,
        max_concurrency=max_concurrency,
        untrusted=untrusted,
        allowed_types=allowed_types,
    )


def _watch_parent(parent_pid: int) -> None:
    """End this process group soon after ``parent_pid`` ends, even mid-call.

    A bare ``_thread`` thread: ``threading.Thread.start()`` waits until the new
    thread has run, which cost most of a millisecond of every start here.
    """
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or the parent is gone
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            poll.poll()
        else:  # look twice a second
            while _pid_exists(parent_pid):
                time.sleep(0.5)
        _end_group()

    _thread.start_new_thread(watch, ())


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group() -> None:
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)
