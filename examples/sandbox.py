"""Isolating unsafe code: run it in a limited, untrusted child that can be killed and replaced.

Run from the repository root::

    python examples/sandbox.py

The child gets an address-space limit and a CPU-time limit (``Limits``), its
replies are decoded as hostile (``untrusted=True``), a call that runs past its
timeout kills it (``on_timeout="kill"``) and the next call gets a fresh one
(``restart="on-failure"``). Then the parent throws four faults at it: a
memory bomb, a runaway loop, a CPU hog and a segfault, and carries on.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import time

import pipe_rpc

MiB = 1 << 20


class UnsafeCode:
    """Stands for code you do not trust: a plugin, a C extension, a user's script."""

    def __init__(self) -> None:
        # The crash below must not leave a core file behind.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def total(self, values: list[int]) -> int:
        return sum(values)

    def allocate(self, nbytes: int) -> int:
        return len(bytearray(nbytes))

    def spin(self) -> None:
        while True:
            pass

    def crash(self) -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a broken C extension would


def main() -> None:
    limits = pipe_rpc.Limits(memory_bytes=512 * MiB, cpu_seconds=2)
    server = pipe_rpc.spawn(
        UnsafeCode,
        limits=limits,
        untrusted=True,
        timeout=1.0,
        on_timeout="kill",
        restart="on-failure",
    )
    with server as sandbox:
        print(f"sandbox: child {server.pid}, {limits}")
        print(f"sandbox: total([1, 2, 3]) = {sandbox.total([1, 2, 3])}")

        # 1. A memory bomb fails its own call; the child lives on.
        try:
            sandbox.allocate(4 << 30)
        except MemoryError:
            print(
                f"memory bomb: MemoryError in the caller; child {server.pid} still answers: "
                f"total = {sandbox.total([4, 5])}"
            )

        # 2. A runaway loop is killed at its timeout, and the next call gets a new child.
        before = server.pid
        started = time.monotonic()
        try:
            sandbox.spin()
        except pipe_rpc.CallTimeoutError:
            took = time.monotonic() - started
            print(
                f"runaway loop: CallTimeoutError after {took:.2f} s; child {before} killed "
                f"(exit code {server.exitcode})"
            )
        answer = sandbox.total([6])  # this call starts the replacement
        print(f"runaway loop: replaced by child {server.pid}, which answers total = {answer}")

        # 3. A CPU hog with no timeout is stopped by its CPU-time limit.
        try:
            pipe_rpc.options(sandbox, timeout=None).spin()
        except pipe_rpc.WorkerDiedError as exc:
            print(f"cpu hog: WorkerDiedError: {exc}")

        # 4. A segfault kills the child; the caller gets WorkerDiedError naming the signal.
        try:
            sandbox.crash()
        except pipe_rpc.WorkerDiedError as exc:
            print(f"crash: WorkerDiedError: {exc}")
        answer = sandbox.total([7, 8])
        print(f"crash: the next call goes to a fresh child {server.pid}: total = {answer}")

    print("sandbox: all faults contained; the parent was never affected")


if __name__ == "__main__":
    main()
