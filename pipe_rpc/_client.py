"""The client: ``Client[T]``, typed proxies and ``options()``.

Threads share one client. A call registers its slot, writes its frame under
the write lock, then waits for its reply.

A caller alone on a client reads its own reply: it takes the read lock and
polls the pipe, with no other thread involved. With no deadline and no call
pending it does not even enter its call in the pending table unless the
reply that comes is not its plain return value (``_call_alone``). When a
second thread calls while the first is reading, the client starts a *reader
thread*: from then on callers sleep on a lock of their own, and the reader
takes every reply that has come in one read, matches each to its call, and
wakes the owners just before it sleeps again (so a woken caller finds the
interpreter free). The reader thread ends once no call has been pending for
``_READER_LINGER`` seconds, and the next lone caller reads for itself again.

A thread that found another call in progress gets a *side channel* on its
next call, where the pipe is a Unix socket (see ``_protocol``): a socket of
its own to the server, which it writes its calls to and reads its replies
from. The kernel then wakes each caller when its own reply comes, with no
reader thread in between and no lock shared with other callers. At most
``MAX_CHANNELS`` threads get one; the others, and every thread when the
server refuses, go on sharing the pipe. A side channel ends with its thread.
Where the client watches the server's process and the system has eventfd, a
side channel comes with a doorbell, which a caller with no deadline sleeps on
before it reads its reply (see ``_protocol``).
"""

from __future__ import annotations

import _thread
import copy
import functools
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from ._codec import Body, Codec
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    PipeRPCError,
    ProtocolError,
    StartupError,
    WorkerDiedError,
    describe_exitcode,
)
from ._messages import Channel, OpenChannel, Shutdown
from ._protocol import MAX_CHANNELS, NOT_QUICK, ClientProtocol, StartupFailedSignal
from ._transport import (
    PeerGone,
    Transport,
    WriteTimeout,
    enlarge_buffers,
    is_unix_stream,
    remaining,
    shutdown,
)

T = TypeVar("T")

#: How long a lost connection waits for the peer process's exit code.
_EXIT_GRACE = 2.0
#: How long the reader thread stays once no call is pending.
_READER_LINGER = 0.05


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """Return ``timeout`` if it is ``None`` or a number > 0, else raise ``ValueError``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"{what} must be None or > 0, got {timeout!r}")
    return float(timeout)


class HasSentinel(Protocol):
    """A process handle: anything with a ``sentinel`` descriptor (``multiprocessing.Process``)."""

    @property
    def sentinel(self) -> int: ...


class Invoker(Protocol):
    """What a proxy calls through: a ``Client`` or a ``Server``."""

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any: ...


class _Slot:
    """One call's place in the pending table."""

    __slots__ = ("done", "ok", "value", "waiter")

    def __init__(self) -> None:
        self.done = False
        self.ok = False
        self.value: Any = None
        self.waiter: Any = None


class _SideChannel:
    """A calling thread's own connection to the server; closed when the thread is gone.

    It holds bare descriptors, not a socket object: it may be collected with its
    client in a reference cycle, in any order, and must close quietly.
    ``doorbell``: its eventfd, or -1. ``lock`` keeps ``wake()`` (another thread)
    and ``close()`` apart, so that a wake never touches a reused descriptor. It is
    reentrant: a garbage collection that starts inside ``wake()`` may run a finalizer
    that breaks the same client, which wakes this channel again.
    """

    __slots__ = ("__weakref__", "doorbell", "fd", "lock", "transport")

    def __init__(
        self, sock: socket.socket, doorbell: int, sentinel: int | None, max_frame: int | None
    ) -> None:
        self.lock = threading.RLock()
        self.fd = sock.detach()
        self.doorbell = doorbell
        self.transport = Transport(self, sentinel=sentinel, max_frame=max_frame)
        _SIDE_CHANNELS.add(self)

    def fileno(self) -> int:
        return self.fd

    def wake(self) -> None:
        """Wake the thread sleeping on the channel, to find end of file (the socket is shut
        down both ways) or, at its next call, a broken client."""
        with self.lock:
            if self.fd >= 0:
                shutdown(self)
            if self.doorbell >= 0:
                os.eventfd_write(self.doorbell, 1)

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
            doorbell, self.doorbell = self.doorbell, -1
        if fd >= 0:
            _close(fd)
        if doorbell >= 0:
            _close(doorbell)

    def __del__(self) -> None:
        self.close()


class _PeerWatch:
    """A thread that sleeps until the server process ends, then says so and wakes side channels.

    Threads sleep in ``read`` on their side channels, or on their doorbells,
    which do not watch the sentinel; ``wake()`` wakes them (they read what is
    left, then end of file). ``ended`` lets a ``Server`` see a death before a
    call, without a system call of its own. ``stop()`` (the client is closed or
    gone) ends it.
    It holds the client's side channels but not the client.
    """

    def __init__(self, sentinel: int, channels: weakref.WeakSet[_SideChannel]) -> None:
        self.ended = False
        self._channels = channels
        wake, self._stop = os.pipe()
        self._stop_lock = threading.Lock()
        # A bare thread: threading.Thread.start() waits for the thread to run.
        _thread.start_new_thread(self._run, (sentinel, wake))
        _WATCHES.add(self)

    def _run(self, sentinel: int, wake: int) -> None:
        poll = select.poll()
        poll.register(sentinel, select.POLLIN)
        poll.register(wake, select.POLLIN)
        try:
            events = dict(poll.poll())
            if wake not in events:
                self.ended = True
                for channel in list(self._channels):
                    channel.wake()
        finally:
            os.close(wake)

    def stop(self) -> None:
        with self._stop_lock:
            stop, self._stop = self._stop, -1
        if stop >= 0:
            os.close(stop)


#: Every open side channel of this process, so that a forked server child closes them.
_SIDE_CHANNELS: weakref.WeakSet[_SideChannel] = weakref.WeakSet()


#: Every running watcher of this process, so that a forked server child closes its pipe.
_WATCHES: weakref.WeakSet[_PeerWatch] = weakref.WeakSet()


def close_inherited_channels() -> None:
    """In a child just forked: close the side channels of the parent's clients, and its
    end of their watchers' pipes (so that closing the parent's end still stops them)."""
    for channel in list(_SIDE_CHANNELS):
        channel.close()
    for watch in list(_WATCHES):
        watch.stop()


def _fresh_channel_locks() -> None:
    """In any child just forked: a thread of the parent may have held a channel's lock,
    and a held lock would never be released there (closing the channel would hang)."""
    for channel in list(_SIDE_CHANNELS):
        channel.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_channel_locks)


class _ThreadState(threading.local):
    """What a client keeps for each calling thread."""

    def __init__(self) -> None:
        self.channel: _SideChannel | None = None
        self.contended = False  # a call of this thread found another call in progress
        self.waiter: Any = None  # the lock it sleeps on while the reader thread reads


def fresh_error(error: PipeRPCError) -> PipeRPCError:
    """A copy of ``error`` for one more caller (each raise gets its own traceback)."""
    fresh = copy.copy(error)
    fresh.__cause__ = error.__cause__
    return fresh


def _signal(waiter: Any) -> None:
    try:
        waiter.release()
    except RuntimeError:  # already signalled and not yet consumed
        pass


class Client(Generic[T]):
    """A thread-safe client over one end of a duplex ``multiprocessing.Pipe``.

    Args:
        conn: the client's end; ``serve()`` runs on the other.
        timeout: default seconds for every call (``None``: no bound).
        process: the server's process (anything with ``.sentinel``), so that
            its death fails calls at once with ``WorkerDiedError``.
        untrusted: decode replies with the restricted unpickler (see README).
        allowed_types: with ``untrusted``, the types a reply may contain besides plain data.
        max_reply_bytes: refuse replies larger than this (``ProtocolError``).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        timeout: float | None = None,
        process: HasSentinel | None = None,
        untrusted: bool = False,
        allowed_types: Iterable[type] = (),
        max_reply_bytes: int | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self._conn = conn
        self._process = process
        self.death_hint: Callable[[int], str] = lambda exitcode: ""
        sentinel = getattr(process, "sentinel", None) if process is not None else None
        self._sentinel = sentinel
        self._max_reply_bytes = max_reply_bytes
        self._protocol: ClientProtocol[_Slot] = ClientProtocol(
            Codec(untrusted=untrusted, allowed_types=allowed_types)
        )
        self._transport = Transport(conn, sentinel=sentinel, max_frame=max_reply_bytes)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        # Guards the reader thread's start and end, _opening and the watcher's start.
        self._state_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._local = _ThreadState()
        self._channels: weakref.WeakSet[_SideChannel] = weakref.WeakSet()
        self._channels_ok = is_unix_stream(conn)
        self._opening = 0  # side channels being opened right now
        self._closed = False
        self._broken: PipeRPCError | None = None
        self.proxy: T = cast(T, Proxy(self, DEFAULT))
        # The thread that watches the server's process, started with the first side
        # channel: a thread in a process that had none would make a later fork start
        # method fork a multi-threaded parent. ``watch.ended``: it saw the process end.
        self.watch: _PeerWatch | None = None
        enlarge_buffers(conn)
        try:
            self._transport.write(self._protocol.greeting())
        except PeerGone:
            # The peer may have written before it went (a child whose factory failed
            # reports it and exits): the first read takes that, then finds the end.
            pass

    # -- public -------------------------------------------------------------

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the service's method ``name`` with the client's default timeout."""
        return self.invoke(name, args, kwargs, DEFAULT)

    def close(self) -> None:
        """Ask the server to stop, fail calls in flight (``ClientClosedError``), close the pipe."""
        if self._closed:
            return
        self._closed = True
        if self._write_lock.acquire(timeout=0.5):
            try:
                self._transport.write(self._protocol.codec.encode(Shutdown()), time.monotonic())
            except (PeerGone, WriteTimeout, OSError):
                pass
            finally:
                self._write_lock.release()
        shutdown(self._conn)
        self._break(ClientClosedError("the client was closed"))
        if self.watch is not None:
            self.watch.stop()
        got_reader = self._read_lock.acquire(timeout=1.0)
        try:
            self._conn.close()
        finally:
            if got_reader:
                self._read_lock.release()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(1.0)

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._closed

    @property
    def broken(self) -> PipeRPCError | None:
        """Why the connection is dead, or ``None`` while it works."""
        return self._broken

    @property
    def late_replies(self) -> int:
        """Replies that came after their call had timed out, and were dropped."""
        return self._protocol.late_replies

    def __enter__(self) -> Client[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- calls --------------------------------------------------------------

    def invoke(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` and wait for its reply (``timeout`` DEFAULT: the client's)."""
        if self._closed:
            raise ClientClosedError("the client was closed")
        if self._broken is not None:
            raise fresh_error(self._broken)
        if timeout is DEFAULT:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self._local
        channel = state.channel
        if channel is None and state.contended and self._channels_ok:
            channel = self._open_channel(state, deadline)
            if self._broken is not None:
                raise fresh_error(self._broken)
        if channel is not None and deadline is None:
            return self._call_channel(channel, method, args, kwargs)
        if (
            deadline is None
            and channel is None
            and self._reader is None
            and not self._protocol.pending
            and self._read_lock.acquire(False)
        ):
            return self._call_alone(method, args, kwargs)
        slot = _Slot()
        call_id, frame = self._protocol.send_call(method, args, kwargs, slot)
        if channel is not None:
            transport = channel.transport
            transport.set_blocking(False)
            try:
                transport.write(frame, deadline)
            except PeerGone as exc:
                self._gone(str(exc))
            except WriteTimeout:  # the channel is no longer framed: drop it, keep the client
                self._drop_channel(state, channel)
                self._protocol.abandon(call_id)
                raise CallTimeoutError(f"{method}() timed out after {timeout} s sending") from None
            self._read_for(slot, call_id, deadline, transport)
            if not slot.done:
                # Nobody would read its late reply: a big one would block the server's
                # write, and every other caller with it. Closing makes that write fail.
                self._drop_channel(state, channel)
        elif not self._exchange(slot, call_id, frame, deadline):
            raise CallTimeoutError(f"{method}() timed out after {timeout} s waiting to send")
        if slot.ok:
            return slot.value
        if not slot.done:
            raise CallTimeoutError(f"{method}() timed out after {timeout} s")
        raise slot.value

    def _call_channel(
        self, channel: _SideChannel, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call on this thread's side channel with no deadline: the hot path of threads.

        One write, then a read that sleeps in ``read`` itself. Most often that read
        brings exactly this call's return value, decoded without the pending table;
        anything else is matched as on the pipe, the call registered first. No reader
        to wake, no lock: the channel is this thread's alone.
        """
        protocol = self._protocol
        call_id, frame = protocol.start_call(method, args, kwargs)
        transport = channel.transport
        if not transport.blocking:
            transport.set_blocking(True)
        try:
            transport.write(frame)
            if channel.doorbell >= 0:  # at most once a call: the ring may come before the reply
                os.eventfd_read(channel.doorbell)
            bodies = transport.read_wait()
            if len(bodies) == 1:
                value = protocol.quick_result(bodies[0], call_id)
                if value is not NOT_QUICK:
                    return value
        except (PeerGone, ProtocolError, OSError) as exc:
            self._read_failed(exc)
            assert self._broken is not None  # _read_failed broke the client
            raise fresh_error(self._broken) from None
        except BaseException:  # an interrupt may have cut a frame: the channel's framing is lost
            self._drop_channel(self._local, channel)
            raise
        slot = _Slot()
        protocol.register(call_id, slot)
        try:
            self._read_channel(slot, transport, bodies)  # done, or failed by _break
        except BaseException:
            protocol.abandon(call_id)
            self._drop_channel(self._local, channel)
            raise
        if slot.ok:
            return slot.value
        raise slot.value

    def _call_alone(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call with no deadline by a thread alone on the pipe: the hot path of one thread.

        The caller holds the read lock, and no call was pending: no other thread
        reads, so the reply can only come to this one. Most often one read brings
        exactly this call's return value, decoded without the pending table; anything
        else (another thread's reply too, a raise) is handed out by ``_hand_out``,
        this call registered first.
        """
        protocol = self._protocol
        transport = self._transport
        try:
            call_id, frame = protocol.start_call(method, args, kwargs)
            with self._write_lock:
                try:
                    transport.write(frame)
                except PeerGone as exc:
                    self._break(self._lost(str(exc)))
            bodies: list[Body] | None = None
            if self._broken is None:
                try:
                    bodies = transport.read_blocking()
                except (PeerGone, StartupFailedSignal, ProtocolError, OSError) as exc:
                    self._read_failed(exc)  # breaks the client
            if bodies is None:  # a reply that came is returned, even if the client broke since
                assert self._broken is not None
                raise fresh_error(self._broken)
            if len(bodies) == 1:
                value = protocol.quick_result(bodies[0], call_id)
                if value is not NOT_QUICK:
                    return value
            slot = _Slot()
            protocol.register(call_id, slot)
            try:
                self._hand_out(bodies)
            except (StartupFailedSignal, ProtocolError) as exc:
                self._read_failed(exc)
            self._read_for(slot, call_id, None)
        finally:
            self._read_lock.release()
        if slot.ok:
            return slot.value
        raise slot.value

    def _drop_channel(self, state: _ThreadState, channel: _SideChannel) -> None:
        """Stop using this thread's side channel (its next contended call asks again)."""
        state.channel = None
        self._channels.discard(channel)
        channel.close()

    def _exchange(
        self,
        slot: _Slot,
        call_id: int,
        frame: list[Any],
        deadline: float | None,
        fds: list[int] | None = None,
    ) -> bool:
        """Send a registered call's frame on the pipe and wait for its outcome.

        False: the deadline passed before the frame could be sent (the call is abandoned).
        """
        left = remaining(deadline)
        if not self._write_lock.acquire(timeout=-1 if left is None else left):
            self._protocol.abandon(call_id)
            return False
        try:
            self._transport.write(frame, deadline, fds or ())
        except PeerGone as exc:
            self._break(self._lost(str(exc)))
        except WriteTimeout:
            self._break(ConnectionLostError("a call timed out half-way through its request"))
        finally:
            self._write_lock.release()
        self._wait(slot, call_id, deadline)
        return True

    def _open_channel(self, state: _ThreadState, deadline: float | None) -> _SideChannel | None:
        """Give this thread a side channel; ``None`` if it cannot have one now.

        Two exchanges on the pipe: ``OpenChannel`` (the server gets ready to take a
        descriptor), then ``Channel`` with one end of a new socket pair. A refusal
        turns side channels off for this client; a timeout gives up for this call.
        """
        state.contended = False
        with self._state_lock:  # other threads may be opening theirs right now
            if len(self._channels) + self._opening >= MAX_CHANNELS:
                return None
            self._opening += 1
        try:
            try:
                ours, theirs = socket.socketpair()
            except OSError:  # out of descriptors here: share the pipe for now
                return None
            # A doorbell only where the watcher will ring it if the server process ends.
            doorbell = _new_doorbell() if self._sentinel is not None else -1
            fds = [theirs.fileno()] if doorbell < 0 else [theirs.fileno(), doorbell]
            granted = False
            try:
                granted = self._request(OpenChannel, deadline) and self._request(
                    functools.partial(Channel, doorbell=doorbell >= 0), deadline, fds
                )
            except OSError:  # the descriptors could not be sent: share the pipe from now on
                self._channels_ok = False
            finally:  # an interrupt too: the doorbell is a bare descriptor, nothing else closes it
                theirs.close()
                if not granted:
                    ours.close()
                    if doorbell >= 0:
                        os.close(doorbell)
            if not granted:
                return None
            enlarge_buffers(ours)
            channel = _SideChannel(ours, doorbell, self._sentinel, self._max_reply_bytes)
            self._channels.add(channel)
            with self._state_lock:
                if self._sentinel is not None and self.watch is None:
                    self.watch = _PeerWatch(self._sentinel, self._channels)
                    weakref.finalize(self, self.watch.stop)
            if self.watch is not None and self.watch.ended:  # it looked before this was added
                channel.wake()
        finally:
            with self._state_lock:
                self._opening -= 1
        state.channel = channel
        return channel

    def _request(
        self,
        make: Callable[[int], OpenChannel | Channel],
        deadline: float | None,
        fds: list[int] | None = None,
    ) -> bool:
        """Ask the server machinery for something (``make(call_id)``); True if it granted it."""
        slot = _Slot()
        call_id, frame = self._protocol.send_request(make, slot)
        try:
            self._exchange(slot, call_id, frame, deadline, fds)
        except OSError:
            self._protocol.abandon(call_id)
            raise
        if slot.done and not slot.ok and self._broken is None:
            self._channels_ok = False  # refused: the server cannot take side channels
        return slot.ok

    def _wait(self, slot: _Slot, call_id: int, deadline: float | None) -> None:
        """Return when the slot is done, or its deadline passed and the call was abandoned."""
        if self._reader is None and self._read_lock.acquire(False):  # alone: read for ourselves
            try:
                self._read_for(slot, call_id, deadline)
            finally:
                self._read_lock.release()
            return
        # Publish before looking for a reader: a reader that reads after this line wakes us,
        # and so does one that ends after it.
        slot.waiter = self._thread_waiter()
        self._local.contended = True
        while not slot.done:
            if self._reader is None:
                self._start_reader()
            left = remaining(deadline)
            if left == 0.0:
                if self._protocol.abandon(call_id):
                    return
                left = 0.01  # its reply is being handed over right now
            slot.waiter.acquire(True, -1 if left is None else left)

    def _read_for(
        self, slot: _Slot, call_id: int, deadline: float | None, transport: Transport | None = None
    ) -> None:
        """As the lone reader of the pipe (or of a side channel, ``transport``), read until
        ``slot`` is done or its deadline passed (abandoned)."""
        transport = transport or self._transport
        while not slot.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if self._protocol.abandon(call_id):
                    return
                left = 0.01  # its outcome is being handed over right now
            self._read_once(left, len(self._protocol.pending) < 2, transport)

    def _start_reader(self) -> None:
        """Make sure the reader thread runs (callers sleep; it reads for all)."""
        with self._state_lock:
            if self._reader is not None:
                return
            self._reader = threading.Thread(
                target=self._reader_main, name="pipe_rpc-reader", daemon=True
            )
            self._reader.start()

    def _reader_main(self) -> None:
        """The reader thread: read and hand out replies until none is pending for a while."""
        pending = self._protocol.pending
        try:
            with self._read_lock:  # a lone caller still reading finishes first
                idle_since = time.monotonic()
                while self._broken is None:
                    if pending:
                        self._read_once(_READER_LINGER, False)
                        idle_since = time.monotonic()
                        continue
                    left = idle_since + _READER_LINGER - time.monotonic()
                    if left > 0:
                        self._read_once(left, False)
                        continue
                    with self._state_lock:
                        if not pending:
                            self._reader = None
                            return
        except BaseException as exc:  # a bug here must not leave callers waiting for ever
            self._break(ConnectionLostError(f"the client's reader thread failed: {exc!r}"))
        finally:
            with self._state_lock:
                if self._reader is threading.current_thread():
                    self._reader = None
            # A call may have come while this thread decided to end: wake it to read.
            self._wake_all()

    def _read_once(
        self, timeout: float | None, spin: bool = False, transport: Transport | None = None
    ) -> None:
        """Read and hand out what comes within ``timeout``; a dead connection breaks the client.

        ``transport``: a side channel instead of the pipe. Owners are woken after the
        whole read is handed out.
        """
        try:
            self._hand_out((transport or self._transport).read(timeout, spin))
        except (PeerGone, StartupFailedSignal, ProtocolError, OSError) as exc:
            self._read_failed(exc)

    def _hand_out(self, bodies: list[Body]) -> None:
        """Give each reply in ``bodies`` to its call; wake the owners once all are handed out.

        Raises:
            ProtocolError, StartupFailedSignal: as ``receive`` (the owners of the replies
                handed out before are woken all the same).
        """
        woken: list[Any] = []
        try:
            for body in bodies:
                got = self._protocol.receive(body)
                if got is not None:
                    waiter = self._deliver(*got)
                    if waiter is not None:
                        woken.append(waiter)
        finally:
            for waiter in woken:
                _signal(waiter)

    def _read_channel(self, slot: _Slot, transport: Transport, bodies: list[Body]) -> None:
        """Hand out ``bodies``, then sleep in ``read`` on this thread's side channel until
        ``slot`` is done (no deadline) or the connection is dead."""
        receive = self._protocol.receive
        try:
            while True:
                for body in bodies:
                    got = receive(body)
                    if got is not None:
                        self._deliver(*got)  # no waiter: the owner is this thread
                if slot.done:
                    return
                bodies = transport.read_wait()
        except (PeerGone, StartupFailedSignal, ProtocolError, OSError) as exc:
            self._read_failed(exc)

    def _read_failed(self, exc: Exception) -> None:
        """A read raised ``exc``: break the client with the error that says why."""
        if isinstance(exc, PeerGone):
            self._gone(str(exc))
        elif isinstance(exc, StartupFailedSignal):
            error = exc.message.error
            failure = StartupError(
                f"the factory failed in the child: {error!r}",
                remote_traceback=str(error.__cause__ or ""),
            )
            failure.__cause__ = error
            self._break(failure)
        elif isinstance(exc, ProtocolError):
            self._break(exc)
        else:
            self._break(self._closed_error() if self._closed else self._lost(repr(exc)))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the server's hello (``spawn`` uses this to surface ``StartupError``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            while self._protocol.peer is None and self._broken is None:
                left = remaining(deadline)
                if left == 0.0:
                    raise CallTimeoutError(f"no hello from the server after {timeout} s")
                self._read_once(left)
        if self._broken is not None:
            raise fresh_error(self._broken)

    def _deliver(self, slot: _Slot, ok: bool, value: Any) -> Any:
        """Give the call its outcome; return the waiter to wake (None: it reads for itself)."""
        slot.ok = ok
        slot.value = value
        slot.done = True
        return slot.waiter

    def _wake_all(self) -> None:
        for slot in list(self._protocol.pending.values()):
            waiter = slot.waiter
            if waiter is not None and not slot.done:
                _signal(waiter)

    def _thread_waiter(self) -> Any:
        state = self._local
        if state.waiter is None:
            state.waiter = threading.Lock()
            state.waiter.acquire()
        return state.waiter

    # -- failure ------------------------------------------------------------

    def connection_lost(self, reason: str) -> None:
        """Fail every pending and later call as if the peer had gone (its exit code if known)."""
        if self._broken is None and not self._closed:
            self._break(self._lost(reason))

    def _gone(self, reason: str) -> None:
        """The pipe or a side channel ended: the connection is dead."""
        self._break(self._broken if self._broken is not None else self._lost(reason))

    def _break(self, error: PipeRPCError) -> None:
        """The connection is dead: every pending call and every later call gets ``error``."""
        if self._broken is None:
            self._broken = error
            for channel in list(self._channels):  # wake the threads reading their own
                channel.wake()
        pending = self._protocol.pending
        while pending:
            try:
                _, slot = pending.popitem()
            except KeyError:
                break
            waiter = self._deliver(slot, False, fresh_error(self._broken))
            if waiter is not None:
                _signal(waiter)

    def _closed_error(self) -> ClientClosedError:
        return ClientClosedError("the client was closed")

    def _lost(self, reason: str) -> PipeRPCError:
        """The error for a peer that went away: ``WorkerDiedError`` when we know its process."""
        if self._closed:
            return self._closed_error()
        process = self._process
        if process is None:
            return ConnectionLostError(f"the connection to the server was lost: {reason}")
        exitcode = _wait_exitcode(process, _EXIT_GRACE)
        pid = getattr(process, "pid", None)
        if exitcode is None:
            return ConnectionLostError(
                f"the connection to server process {pid} was lost ({reason}), "
                "but the process has not exited"
            )
        hint = self.death_hint(exitcode)
        return WorkerDiedError(
            f"server process {pid} {describe_exitcode(exitcode)}{hint}", exitcode=exitcode
        )


def _new_doorbell() -> int:
    """A new eventfd for a side channel, blocking (-1: the system has none, or no
    descriptor is left)."""
    eventfd = getattr(os, "eventfd", None)
    if eventfd is None:
        return -1
    try:
        return cast(int, eventfd(0, os.EFD_CLOEXEC))
    except OSError:
        return -1


def _wait_exitcode(process: HasSentinel, grace: float) -> int | None:
    """The process's exit code, waiting up to ``grace`` seconds for it to end."""
    poll = select.poll()
    try:
        poll.register(process.sentinel, select.POLLIN)
        poll.poll(grace * 1000)
    except (OSError, ValueError):
        pass
    join = getattr(process, "join", None)
    deadline = time.monotonic() + grace
    while True:
        if join is not None:
            try:
                join(0.05)
            except (AssertionError, ValueError, OSError):
                pass
        exitcode = getattr(process, "exitcode", None)
        if exitcode is not None or time.monotonic() >= deadline:
            return cast("int | None", exitcode)


class _Method:
    """A bound remote method: ``proxy.add`` in ``proxy.add(1, 2)``."""

    __slots__ = ("_invoke", "_name", "_timeout")

    def __init__(self, invoker: Invoker, name: str, timeout: float | None) -> None:
        self._invoke = invoker.invoke
        self._name = name
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(self._name, args, kwargs, self._timeout)

    def __repr__(self) -> str:
        return f"<remote method {self._name}>"


class Proxy:
    """Turns attribute calls into remote calls; underscore names are answered locally."""

    def __init__(self, invoker: Invoker, timeout: float | None) -> None:
        object.__setattr__(self, "_pipe_rpc_invoker", invoker)
        object.__setattr__(self, "_pipe_rpc_timeout", timeout)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = _Method(self._pipe_rpc_invoker, name, self._pipe_rpc_timeout)
        object.__setattr__(self, name, method)  # cache: the next look-up skips __getattr__
        return method

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot set {name!r} on a pipe_rpc proxy")

    def __repr__(self) -> str:
        return f"<pipe_rpc proxy for {self._pipe_rpc_invoker!r}>"

    _pipe_rpc_invoker: Invoker
    _pipe_rpc_timeout: float | None


def options(proxy: T, *, timeout: float | None) -> T:
    """The same proxy with per-call options: ``options(calc, timeout=0.5).add(1, 2)``.

    Raises:
        TypeError: ``proxy`` is not a pipe_rpc proxy.
        ValueError: ``timeout`` is not ``None`` or > 0.
    """
    if not isinstance(proxy, Proxy):
        raise TypeError(f"options() takes a pipe_rpc proxy, got {type(proxy).__name__}")
    return cast(T, Proxy(proxy._pipe_rpc_invoker, check_timeout(timeout)))
