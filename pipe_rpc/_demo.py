"""The demonstration ``python -m pipe_rpc`` runs: the main job in a few seconds.

A service runs in a child process; the parent calls it through a typed proxy,
gets a remote exception back as itself, times a runaway call out, and carries
on after the child crashes hard.
"""

from __future__ import annotations

import ctypes
import os
import time

import pipe_rpc


class Demo:
    """A service with a good method, a failing one, a slow one and a fatal one."""

    def add(self, a: int, b: int) -> int:
        return a + b

    def divide(self, a: float, b: float) -> float:
        return a / b

    def spin(self) -> None:
        while True:
            pass

    def crash(self) -> None:
        ctypes.string_at(0)  # a segfault, as a broken C extension would do

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    with pipe_rpc.spawn(Demo, restart="on-failure", on_timeout="kill") as demo:
        print(f"parent {os.getpid()}, service in child {demo.pid()}")
        print(f"add(1, 2) = {demo.add(1, 2)}")

        try:
            demo.divide(1, 0)
        except ZeroDivisionError as exc:
            print(f"remote exception kept its type: {type(exc).__name__}: {exc}")
            where = [line.strip() for line in str(exc.__cause__).splitlines() if "File" in line]
            print(f"  raised in the child at: {where[-1]}")

        started = time.monotonic()
        try:
            pipe_rpc.options(demo, timeout=0.5).spin()
        except pipe_rpc.CallTimeoutError as exc:
            print(f"runaway call stopped after {time.monotonic() - started:.2f} s: {exc}")
        print(f"the runaway child was killed; a fresh one answers: pid {demo.pid()}")

        try:
            demo.crash()
        except pipe_rpc.WorkerDiedError as exc:
            print(f"crash reported, parent unharmed: {exc}")
        print(f"next call goes to a fresh child: pid {demo.pid()}, add(2, 3) = {demo.add(2, 3)}")
