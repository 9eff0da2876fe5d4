"""How fast can N Python threads share one child at all? A floor for figure 2.

Figure 2 asks for 4 threads on one proxy to beat the raw loop's sequential
rate by 1.5x. This script measures, on the same machine, what the simplest
possible clients reach, with no deadlines and no error handling:

- a shared pipe: a hand-written reader thread that wakes each caller, against
  a child that answers everything it has read in one write;
- a socket per thread: each thread sends one end of a socket pair to the
  child (``SCM_RIGHTS``, as pipe_rpc's side channels do) and sleeps in
  ``read`` on its own socket, against a child that waits on all of them;

both children spin for 100 us before they sleep. It also times a bare thread
handoff (one ``Lock`` released by one thread and acquired by another), which
every call of a thread woken by another costs at least once under the GIL.
Run: ``python benchmarks/thread_floor.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import select
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

if __package__ in (None, ""):  # run as a script: make pipe_rpc importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipe_rpc

_HEAD = struct.Struct("!iQ")  # length of what follows, call id
ROUNDS = 7
CALLS = 4000


def _frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Cut whole frames off the front of ``buffer``."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while len(buffer) - pos >= _HEAD.size:
        size, call_id = _HEAD.unpack_from(buffer, pos)
        if len(buffer) - pos < 4 + size:
            break
        out.append((call_id, bytes(buffer[pos + _HEAD.size : pos + 4 + size])))
        pos += 4 + size
    del buffer[:pos]
    return out


def _answers(buffer: bytearray) -> bytes:
    """The replies to the whole ``add`` calls at the front of ``buffer``, in one write."""
    replies = []
    for call_id, payload in _frames(buffer):
        a, b = pickle.loads(payload)
        result = pickle.dumps(a + b, 5)
        replies.append(_HEAD.pack(len(result) + 8, call_id) + result)
    return b"".join(replies)


def _serve(conn: Connection) -> None:
    fd = conn.fileno()
    os.set_blocking(fd, False)
    buffer = bytearray()
    while True:
        end = time.perf_counter() + 100e-6
        while True:
            try:
                data = os.read(fd, 1 << 16)
                break
            except BlockingIOError:
                if time.perf_counter() > end:
                    select.select([fd], [], [])
        if not data:
            return
        buffer += data
        os.write(fd, _answers(buffer))


class _SharedClient:
    """The least a thread-safe client can do: a write lock and a reader thread."""

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()
        self.pending: dict[int, list[Any]] = {}
        self.write_lock = threading.Lock()
        self.ids = iter(range(1, 1 << 62))
        threading.Thread(target=self._read, daemon=True).start()

    def add(self, a: int, b: int) -> Any:
        waiter = threading.Lock()
        waiter.acquire()
        slot: list[Any] = [waiter, None]
        payload = pickle.dumps((a, b), 5)
        with self.write_lock:
            call_id = next(self.ids)
            self.pending[call_id] = slot
            os.write(self.fd, _HEAD.pack(len(payload) + 8, call_id) + payload)
        waiter.acquire()
        return slot[1]

    def _read(self) -> None:
        buffer = bytearray()
        while True:
            data = os.read(self.fd, 1 << 16)
            if not data:
                return
            buffer += data
            woken = []
            for call_id, payload in _frames(buffer):
                slot = self.pending.pop(call_id)
                slot[1] = pickle.loads(payload)
                woken.append(slot[0])
            for waiter in woken:
                waiter.release()


def _serve_sockets(conn: Connection) -> None:
    """The child for one socket per thread: descriptors come on ``conn``."""
    pipe = socket.socket(fileno=conn.fileno())
    poll = select.poll()
    poll.register(pipe.fileno(), select.POLLIN)
    buffers: dict[int, bytearray] = {}
    while True:
        end = time.perf_counter() + 100e-6
        events = poll.poll(0)
        while not events and time.perf_counter() < end:
            events = poll.poll(0)
        if not events:
            events = poll.poll()
        for fd, _ in events:
            if fd == pipe.fileno():
                message, fds, _, _ = socket.recv_fds(pipe, 16, 4)
                if not message:
                    return
                for new in fds:
                    os.set_blocking(new, False)
                    buffers[new] = bytearray()
                    poll.register(new, select.POLLIN)
                continue
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                poll.unregister(fd)
                os.close(fd)
                del buffers[fd]
                continue
            buffers[fd] += data
            os.write(fd, _answers(buffers[fd]))


class _SocketPerThread:
    """The least a client with a socket per thread can do."""

    def __init__(self, conn: Connection) -> None:
        self.pipe = socket.socket(fileno=conn.fileno())
        self.local = threading.local()
        self.lock = threading.Lock()

    def _own(self) -> socket.socket:
        own: socket.socket | None = getattr(self.local, "socket", None)
        if own is None:
            own, theirs = socket.socketpair()
            with self.lock:
                socket.send_fds(self.pipe, [b"f"], [theirs.fileno()])
            theirs.close()
            self.local.socket = own
        return own

    def add(self, a: int, b: int) -> Any:
        fd = self._own().fileno()
        payload = pickle.dumps((a, b), 5)
        os.write(fd, _HEAD.pack(len(payload) + 8, 1) + payload)
        buffer = bytearray()
        while True:
            buffer += os.read(fd, 1 << 16)
            frames = _frames(buffer)
            if frames:
                return pickle.loads(frames[0][1])


class _Adder:
    def add(self, a: int, b: int) -> int:
        return a + b


def _rate(calls: int, crew: ThreadPoolExecutor, threads: int, call: Any) -> float:
    """Calls per second of ``threads`` threads of ``crew`` calling ``call`` at once.

    The threads live across rounds, as figure 2's do: a client may keep state per
    thread (pipe_rpc's side channels, the socket-per-thread client's sockets).
    """
    per_thread = calls // threads
    ready = threading.Barrier(threads + 1)

    def work() -> None:
        ready.wait()
        for i in range(per_thread):
            call(i, 1)

    running = [crew.submit(work) for _ in range(threads)]
    ready.wait()
    start = time.perf_counter()
    for future in running:
        future.result()
    return per_thread * threads / (time.perf_counter() - start)


def _handoff_us(rounds: int = 50_000) -> float:
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    start = time.perf_counter()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    thread.join()
    return (time.perf_counter() - start) / rounds / 2 * 1e6


def main() -> None:
    ctx = mp.get_context("fork")
    raw_parent, raw_child = ctx.Pipe()
    raw = ctx.Process(target=_raw_serve, args=(raw_child,), daemon=True)
    raw.start()
    shared_parent, shared_child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(shared_child,), daemon=True)
    server.start()
    client = _SharedClient(shared_parent)
    own_parent, own_child = ctx.Pipe()
    own_server = ctx.Process(target=_serve_sockets, args=(own_child,), daemon=True)
    own_server.start()
    per_thread = _SocketPerThread(own_parent)
    calc = pipe_rpc.spawn(_Adder, start_method="fork", restart="on-failure")

    def raw_add(a: int, b: int) -> Any:
        raw_parent.send_bytes(pickle.dumps(("add", (a, b)), 5))
        return pickle.loads(raw_parent.recv_bytes())

    crew = ThreadPoolExecutor(4)
    sequential, shared, sockets, ours = [], [], [], []
    for _ in range(ROUNDS):  # interleaved, so machine drift hits all alike
        sequential.append(_rate(CALLS, crew, 1, raw_add))
        shared.append(_rate(CALLS, crew, 4, client.add))
        sockets.append(_rate(CALLS, crew, 4, per_thread.add))
        ours.append(_rate(CALLS, crew, 4, calc.proxy.add))
    seq, four, own, rpc = (statistics.median(r) for r in (sequential, shared, sockets, ours))
    print(f"raw B, 1 thread:                          {seq:9,.0f} calls/s")
    print(f"minimal shared client, 4 threads:         {four:9,.0f} calls/s ({four / seq:.2f}x)")
    print(f"minimal socket per thread, 4 threads:     {own:9,.0f} calls/s ({own / seq:.2f}x)")
    print(f"pipe_rpc, 4 threads on one proxy:         {rpc:9,.0f} calls/s ({rpc / seq:.2f}x)")
    print(f"thread handoff through a Lock (GIL):      {_handoff_us():9.1f} us")
    calc.close()
    crew.shutdown()
    raw.kill()
    server.kill()
    own_server.kill()


def _raw_serve(conn: Connection) -> None:
    while True:
        try:
            _name, (a, b) = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        conn.send_bytes(pickle.dumps(a + b, 5))


if __name__ == "__main__":
    main()
