"""A parent process for the orphan-protection test: ``orphan_parent.py METHOD idle|busy``.

It spawns a ``Victim`` service with the given start method and prints
``CHILD <pid>``. With ``busy`` it then starts a call that spins for ever on a
thread (the child prints ``BUSY <pid>`` once it runs). Then it prints ``READY``
and waits for ever, until the test kills it with SIGKILL.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipe_rpc
from pipe_rpc._process import StartMethod
from tests.isolation_services import Victim


def say(line: str) -> None:
    """One line in one write: the child writes to the same pipe, lines must not interleave."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def main(method: StartMethod, mode: str) -> None:
    server = pipe_rpc.spawn(Victim, start_method=method)
    say(f"CHILD {server.pid}")
    if mode == "busy":
        threading.Thread(target=server.proxy.announce_and_spin, daemon=True).start()
    say("READY")
    threading.Event().wait()


if __name__ == "__main__":
    method_name, mode_name = sys.argv[1], sys.argv[2]
    methods: dict[str, StartMethod] = {"fork": "fork", "forkserver": "forkserver", "spawn": "spawn"}
    main(methods[method_name], mode_name)
