"""Isolate code that can crash the interpreter (a broken C extension, say).

The service below segfaults its process on purpose. Because it runs in a child,
the parent survives: the call raises ``WorkerDiedError`` naming the signal, and
with ``restart="on-failure"`` the next call goes to a fresh child. The child's
standard error reaches ours, and its end is kept on the error: the child runs
``faulthandler``, so the Python stack of the crash is there.

Run it from the repository root::

    python examples/isolate_crash.py
"""

from __future__ import annotations

import ctypes
import os
import resource

import pipe_rpc


class Fragile:
    """A service with one safe method and one that kills its process."""

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        # No core file for this deliberate crash (the limit is the child's own).
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Read memory at address 0: SIGSEGV, as a buggy C extension would do.
        ctypes.string_at(0)


def main() -> None:
    # restart="on-failure": after the child dies, the next call starts a new
    # one from the same factory. The call that was running is never retried.
    with pipe_rpc.spawn(Fragile, restart="on-failure") as service:
        first = service.pid()
        print(f"first child pid: {first}")

        try:
            service.crash()
        except pipe_rpc.WorkerDiedError as exc:
            # exitcode is negative for a signal, as in multiprocessing. The message
            # goes on with the last lines of the child's stderr (the stack).
            print(f"call failed: {str(exc).splitlines()[0]}")
            print(f"exitcode: {exc.exitcode}")
            print(f"the stack names crash(): {'in crash' in exc.stderr_tail}")

        second = service.pid()  # a fresh child answers
        print(f"second child pid: {second}")
        print(f"fresh child: {first != second}")
        print(f"parent {os.getpid()} is still running")


if __name__ == "__main__":
    main()
