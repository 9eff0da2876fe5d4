"""Parse many inputs on a pool, with a parser that crashes the interpreter on some.

The parser below segfaults on inputs it cannot handle, as a buggy C extension
would. Run on a pool, each crash takes one child and fails that one input with
``WorkerDiedError``; the pool replaces the child and the other inputs are parsed.

Run it from the repository root::

    python examples/pool_parse.py
"""

from __future__ import annotations

import ctypes
import os
import resource

import pipe_rpc


class Parser:
    """Counts the words of a line; a line with a NUL in it kills the process."""

    def parse(self, line: str) -> int:
        if "\0" in line:
            # No core file for this deliberate crash (the limit is the child's own).
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            ctypes.string_at(0)  # SIGSEGV
        return len(line.split())

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    lines = [f"line {n} has {'a few words ' * (n % 4)}" for n in range(40)]
    for n in (7, 19, 31):
        lines[n] = "bad\0input"

    pool = pipe_rpc.pool(Parser, size=2)
    with pool:
        first = set(pool.pids)
        words = 0
        crashed = []
        # Results come in the order of the inputs; a failed input raises from the
        # next() that would have given its result, and the iterator goes on.
        results = pool.map(pool.proxy.parse, lines)
        for n in range(len(lines)):
            try:
                words += next(results)
            except pipe_rpc.WorkerDiedError as exc:
                crashed.append(f"{n} ({exc.exitcode})")
        print(f"parsed {len(lines) - len(crashed)} of {len(lines)} lines, {words} words")
        print(f"crashed on lines: {', '.join(crashed)}")
        print(f"children now: {len(pool.pids)}, replaced: {first != set(pool.pids)}")
        print(f"parent {os.getpid()} is still running")


if __name__ == "__main__":
    main()
