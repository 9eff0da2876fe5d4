"""The CPU cost of one call on each side of the connection core, with no peer process.

    python benchmarks/core_cost.py

- client: ``Client.call("add", 1, 2)`` over one end of a pipe whose other end
  this process writes the server's hello and each reply into, just before the
  call that reads it: the client's whole path (register, write, lead, read,
  settle) with no waiting on another process.
- server: the server loop over one end of a pipe into which every request was
  written beforehand, then the write side shut: the loop's path per request
  (read, cut, decode, run, encode, write), as it runs when requests queue up.

A round trip's wall time on a 2-core machine moves by a third from minute to
minute; these figures move by a few percent, so two versions of the core can be
compared by running this script from each checkout in turn (it measures the
checkout it is in). Nothing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pipe_rpc` importable
    sys.path.insert(0, str(ROOT))

import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402

import pipe_rpc  # noqa: E402
from pipe_rpc._codec import Codec  # noqa: E402
from pipe_rpc._pending import PendingCall  # noqa: E402
from pipe_rpc._protocol import ClientProtocol, ServerProtocol  # noqa: E402
from pipe_rpc._server import _Loop  # noqa: E402

ROUNDS = 5
CALLS = 10_000


class Service:
    def add(self, a: int, b: int) -> int:
        return a + b


def _joined(segments: Sequence[object]) -> bytes:
    return b"".join(bytes(segment) for segment in segments)  # type: ignore[call-overload]


def _pipe(buffer: int) -> tuple[Connection, Connection]:
    ours, theirs = mp.Pipe()
    for end in (ours, theirs):
        sock = socket.socket(fileno=end.fileno())
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        finally:
            sock.detach()
    return ours, theirs


def client_cost(calls: int) -> float:
    """Microseconds of the client's own work per call."""
    ours, theirs = _pipe(1 << 22)
    server = ServerProtocol(Codec())
    fd = theirs.fileno()
    os.write(fd, _joined(server.greeting()))
    replies = [_joined(server.reply(i, True, 3)) for i in range(1, calls + 1)]
    client: pipe_rpc.Client[Service] = pipe_rpc.Client(ours)
    clock, spent = time.perf_counter_ns, 0
    for i in range(calls):
        os.write(fd, replies[i])
        started = clock()
        client.call("add", 1, 2)
        spent += clock() - started
        if i % 500 == 499:  # drain the requests, unread by anyone
            try:
                while len(os.read(fd, 1 << 20)) == 1 << 20:
                    pass
            except BlockingIOError:
                pass
    client.close()
    theirs.close()
    return spent / calls / 1000


def server_cost(calls: int) -> float:
    """Microseconds of the server loop's work per request, requests queued up."""
    ours, theirs = _pipe(1 << 23)
    codec = Codec()
    client: ClientProtocol[PendingCall] = ClientProtocol(codec)
    data = [_joined(client.greeting())]
    data += [_joined(codec.encode_call(i + 1, "add", (1, 2), {})) for i in range(calls)]
    payload = memoryview(b"".join(data))
    os.set_blocking(ours.fileno(), True)
    while payload:
        payload = payload[os.write(ours.fileno(), payload[: 1 << 16]) :]
    sock = socket.socket(fileno=ours.fileno())
    sock.shutdown(socket.SHUT_WR)  # the loop ends at the end of the requests
    sock.detach()
    loop = _Loop(Service(), theirs, 1, Codec())
    started = time.perf_counter_ns()
    loop.run()
    spent = time.perf_counter_ns() - started
    ours.close()
    return spent / calls / 1000


def main() -> None:
    client = [client_cost(CALLS) for _ in range(ROUNDS)]
    server = [server_cost(CALLS) for _ in range(ROUNDS)]
    print(
        f"pipe_rpc at {ROOT}: client {statistics.median(client):.2f} us "
        f"a call, server {statistics.median(server):.2f} us a request "
        f"(medians of {ROUNDS} rounds of {CALLS:,})"
    )


if __name__ == "__main__":
    main()
