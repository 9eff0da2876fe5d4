"""Quickstart: run a service in a child process and call it through a typed proxy.

Run it from the repository root::

    python examples/quickstart.py
"""

from __future__ import annotations

import time

import pipe_rpc


class Calculator:
    """The service. Any object works; its public methods become remote methods."""

    def add(self, a: int, b: int) -> int:
        return a + b

    def divide(self, a: float, b: float) -> float:
        return a / b  # raises ZeroDivisionError in the child for b == 0

    def slow_add(self, a: int, b: int, seconds: float) -> int:
        time.sleep(seconds)
        return a + b


def main() -> None:
    # spawn() starts a child process, builds Calculator() there and returns a
    # Server; `with` yields its proxy, which mypy sees as a Calculator. Leaving
    # the block shuts the child down (gracefully, then by force) and reaps it.
    with pipe_rpc.spawn(Calculator) as calc:
        # 1. A plain call: the arguments go to the child, the result comes back.
        print(f"add(1, 2) = {calc.add(1, 2)}")

        # 2. A remote exception comes back as itself: same type, same args.
        #    Its __cause__ is a RemoteTraceback holding the child's traceback.
        try:
            calc.divide(1, 0)
        except ZeroDivisionError as exc:
            print(f"caught {type(exc).__name__}: {exc}")
            remote = str(exc.__cause__)
            print(f"remote traceback mentions divide(): {'in divide' in remote}")

        # 3. A per-call timeout with pipe_rpc.options(): the same proxy, with a
        #    deadline for its calls. CallTimeoutError is also a TimeoutError.
        #    With the default on_timeout="abandon" the child finishes the call
        #    and its late reply is dropped; it is never delivered to another call.
        started = time.monotonic()
        try:
            pipe_rpc.options(calc, timeout=0.2).slow_add(1, 1, seconds=1.0)
        except pipe_rpc.CallTimeoutError as exc:
            elapsed = time.monotonic() - started
            print(f"timed out after {elapsed:.1f} s: {type(exc).__name__}")

        # 4. The child is still there; this call waits for the slow one to end
        #    (calls run one at a time), then gets its own reply, not the late one.
        print(f"add(2, 3) = {calc.add(2, 3)}")


if __name__ == "__main__":
    main()
