"""A service that writes to its standard error and dies in the ways a process can.

Importable by every start method (``tests.stderr_services``).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

#: One line of the flood: its number, then filler, 64 bytes in all.
FLOOD_LINE = "{:09d} " + "x" * 53 + "\n"


def flood_text(first: int, count: int) -> str:
    return "".join(FLOOD_LINE.format(n) for n in range(first, first + count))


def _no_core_file() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


class Noisy:
    """Writes to fd 2 and ``sys.stderr``; crashes with ``faulthandler`` left as the child set it."""

    def pid(self) -> int:
        return os.getpid()

    def add(self, a: int, b: int) -> int:
        return a + b

    def write(self, text: str) -> None:
        """Through ``sys.stderr``, as Python code writes."""
        sys.stderr.write(text)
        sys.stderr.flush()

    def write_fd(self, data: bytes) -> None:
        """Straight to fd 2, as C code writes."""
        os.write(2, data)

    def segfault_in_service_method(self) -> NoReturn:
        _no_core_file()
        ctypes.string_at(0)
        raise AssertionError("ctypes.string_at(0) did not crash")

    def c_message_then_segfault(self, message: bytes) -> NoReturn:
        _no_core_file()
        os.write(2, message)
        ctypes.string_at(0)
        raise AssertionError("ctypes.string_at(0) did not crash")

    def segfault_deep_down(self, depth: int) -> NoReturn:
        """A crash under ``depth`` frames: faulthandler's report is longer than the tail."""
        _recurse_then_segfault(depth)

    def abort_in_service_method(self) -> NoReturn:
        _no_core_file()
        os.abort()

    def write_then_exit(self, text: str, code: int) -> NoReturn:
        self.write(text)
        os._exit(code)

    def write_then_sigkill(self, text: str) -> NoReturn:
        self.write(text)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("SIGKILL did not kill")

    def flood(self, lines: int, done_marker: str) -> None:
        """Write ``lines`` flood lines in a thread of their own, then create ``done_marker``."""

        def run() -> None:
            block = 4096
            for first in range(0, lines, block):
                sys.stderr.write(flood_text(first, min(block, lines - first)))
            sys.stderr.flush()
            Path(done_marker + ".tmp").write_text("done")
            os.rename(done_marker + ".tmp", done_marker)

        threading.Thread(target=run, daemon=True).start()

    def start_grandchild_holding_stderr(self) -> int:
        """A grandchild in a session of its own (out of reach of the group kill) that
        keeps this process's fd 2, the write end of its stderr pipe, open."""
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        return grandchild.pid

    def block(self, seconds: float) -> None:
        time.sleep(seconds)


def _recurse_then_segfault(depth: int) -> NoReturn:
    if depth > 0:
        _recurse_then_segfault(depth - 1)
    _no_core_file()
    ctypes.string_at(0)
    raise AssertionError("ctypes.string_at(0) did not crash")
