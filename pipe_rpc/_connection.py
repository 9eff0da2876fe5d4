"""The connection core: one pipe and its side channels, the life of a call, reading and waking.

Theory of operation
-------------------

A call has one life, whatever its lane and deadline: it is *registered*
(``ClientProtocol.start`` gives its id and frame, and a ``PendingCall`` waits
in the table), *written* on its lane, then *waited for* until its outcome is
settled, its deadline passes, or it ends early. The front-ends (the sync
``Client``, and the asyncio, stream and pool front-ends) drive calls through
``Connection``; nothing else knows how a reply finds its caller.

Lanes. A call goes on the pipe, shared by every thread, or on its thread's
*side channel* (see ``_protocol``), which a thread other than the main one
gets once it has found another call in progress. The choice is a policy
(``_lane``); both lanes are waited on the same way. The main thread, where
signal handlers run, stays on the pipe: a side channel is made of bare
descriptors, and an interrupt landing between making one and handing it to
its owner would leak it.

Waiting (leader and followers). On the pipe, the first waiting thread that
takes the read lock *leads*: it reads for everyone and settles each reply it
reads, waking that call's owner; the others *follow*, asleep on their own
waiter. When the leader's own call is settled it hands the lead to one
follower. A follower never sleeps longer than ``_RECHECK`` before it looks
whether the lead is free, so a wake-up lost to an interrupt costs a moment,
never a hang. A caller alone on the pipe is its own leader: one write, one
read, its reply settled in place. On a side channel the caller is alone by
construction and reads for itself. A deadline limits a wait; it never picks
another path.

Reading in place. A plain call by a thread alone on its lane (``_call_alone``,
``_call_on``) is registered only if it must be: its reply can only come to that
thread, and most often the first read brings exactly its return value. Until it
is registered it counts in ``in_flight``, and if it ends early its late reply is
dropped as any abandoned call's.

Ending early. A ``KeyboardInterrupt``, any exception a signal handler raises,
a timeout or a dying thread may end a call at any line. Locks are held only
in ``with`` blocks, or taken inside ``try`` and released in ``finally`` by a
bare ``release()`` whose ``RuntimeError`` says the thread did not hold it (an
``RLock`` knows its owner, so a lock acquired just before an interrupt is
still released, and no call stands between the ``finally`` and the release
for an interrupt to land on); the transport never cuts a frame or loses a byte (see
``_transport`` and ``_wire``); a reply settled twice is harmless (see
``_protocol``). The call ends alone: it is abandoned, so its late reply is
dropped, and a side channel it leaves with a call in flight is closed (nobody
would read its reply, and a large one would block the server).

Closing. ``close()`` shuts the pipe down first, which ends every wait and
write on it at once, fails calls in flight, and closes the descriptor only
under both the write and the read lock, after which every path checks
``broken`` before touching it: a descriptor number is never closed under a
thread that may still use it, so a call can never reach another process's
pipe that got the same number.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection as Pipe
from time import perf_counter_ns
from typing import Any, Protocol, cast

from ._codec import Codec
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
from ._lanes import SideChannel, SideChannels
from ._liveness import (
    GENERATION,
    HasSentinel,
    PeerMonitor,
    check_owner,
    fork_generation,
    register_holder,
    wait_exitcode,
)
from ._messages import Cancel, Channel, Credit, Describe, Get, Kind, OpenChannel, Shutdown
from ._protocol import NOT_QUICK, ClientProtocol, StartupFailedSignal
from ._proxy import fresh_error
from ._stats import ERROR, TIMEOUT, Counters
from ._transport import (
    PeerGone,
    Transport,
    WriteTimeout,
    enlarge_buffers,
    is_unix_stream,
    remaining,
    shutdown,
)
from ._wire import Buffer

#: How long a lost connection waits for the peer process's exit code.
_EXIT_GRACE = 2.0
#: A follower's longest sleep before it looks whether the lead is free.
_RECHECK = 0.05
#: What a transport raises when the connection is dead or broke the protocol.
_IO_ERRORS = (PeerGone, ProtocolError, StartupFailedSignal, OSError)


class Waiter(Protocol):
    """What a call wakes when it is settled: a thread's lock, an event loop's future, ...

    ``leads``: the waiter is a thread that can take over reading the pipe when it
    is woken (an event loop reads through its own callback instead).
    """

    leads: bool

    def wake(self) -> None: ...


class ThreadWaiter:
    """A waiter for one thread: a lock that stays held until something wakes it."""

    __slots__ = ("_lock",)
    leads = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already woken and not yet asleep again
            pass

    def sleep(self, timeout: float) -> None:
        self._lock.acquire(True, timeout)


class _Both:
    """Two waiters woken together: a call's own (a future's) and a thread waiting for it."""

    __slots__ = ("first", "second")
    leads = True

    def __init__(self, first: Waiter, second: ThreadWaiter) -> None:
        self.first = first
        self.second = second

    def wake(self) -> None:
        self.first.wake()
        self.second.wake()


class PendingCall:
    """One call's place in the pending table, and its outcome once settled."""

    __slots__ = ("done", "method", "ok", "value", "waiter")

    def __init__(self, method: str = "") -> None:
        self.method = method
        self.done = False
        self.ok = False
        self.value: Any = None
        self.waiter: Waiter | None = None  # set by an owner about to sleep

    def settle(self, ok: bool, value: Any) -> None:
        if not self.done:
            self.ok = ok
            self.value = value
            self.done = True
        waiter = self.waiter  # read after done: an owner that set it after sees done
        if waiter is not None:
            waiter.wake()

    def settled(self) -> bool:
        """``done``, read afresh (where a type checker has narrowed the attribute)."""
        return self.done

    def outcome(self) -> Any:
        """The value, or raise the error (only once ``done``)."""
        if self.ok:
            return self.value
        raise self.value


class _Waiters(threading.local):
    """Each calling thread's waiter, made the first time it sleeps."""

    def __init__(self) -> None:
        self.waiter = ThreadWaiter()


class Connection:
    """The client's end of one pipe to a server, and the life of every call on it.

    Args:
        conn: the client's end; ``serve()`` runs on the other.
        codec: how payloads are pickled and unpickled.
        process: the server's process (anything with ``.sentinel``), so that its
            death fails calls at once with ``WorkerDiedError``.
        max_frame: refuse replies larger than this (``ProtocolError``).
    """

    def __init__(
        self,
        conn: Pipe,
        codec: Codec,
        *,
        process: HasSentinel | None = None,
        max_frame: int | None = None,
    ) -> None:
        self._conn = conn
        self._process = process
        self._sentinel = None if process is None else getattr(process, "sentinel", None)
        self._max_frame = max_frame
        self.generation = fork_generation()
        self.protocol: ClientProtocol[PendingCall] = ClientProtocol(codec)
        self.pipe = Transport(conn, sentinel=self._sentinel, max_frame=max_frame)
        self.death_hint: Callable[[int], str] = lambda exitcode: ""
        self.death_tail: Callable[[], str] = lambda: ""  # the dead child's last stderr
        self.closed = False
        self.broken: PipeRPCError | None = None
        self.counters: Counters | None = None  # a server's: what its calls count into
        self.pump: Any = None  # ``submit``'s thread that completes futures (``_futures._Pump``)
        self.lone = 0  # the id of the call a lone caller reads in place (``_call_alone``)
        self._write_lock = threading.RLock()
        self._read_lock = threading.RLock()
        self._state_lock = threading.Lock()  # the channel count and the monitor's start
        self._waiters = _Waiters()
        self.lanes = SideChannels(self._request, is_unix_stream(conn), self._sentinel, max_frame)
        enlarge_buffers(conn)
        register_holder(self)
        try:
            self.pipe.write(self.protocol.greeting())
        except PeerGone:
            # The peer may have written before it went (a child whose factory failed
            # reports it and exits): the first read takes that, then finds the end.
            pass

    # -- a call's life --------------------------------------------------------

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """Make one call and wait for its outcome: the one path of every sync call.

        Raises:
            CallTimeoutError: ``timeout`` seconds passed (the call is abandoned).
            SerializationError: an argument would not pickle; nothing was sent.
            ClientClosedError, ConnectionLostError, WorkerDiedError, ProtocolError:
                the connection is closed or dead.
        """
        counters = self.counters
        if counters is None:
            return self._call(method, args, kwargs, timeout)
        counts = counters.of(method)  # ``Counters.begin`` and ``end``, written out
        next(counts.started)
        started = perf_counter_ns()
        try:
            value = self._call(method, args, kwargs, timeout)
        except CallTimeoutError:
            counts.finish(started, TIMEOUT)
            raise
        except BaseException:
            counts.finish(started, ERROR)
            raise
        counts.latencies.append(perf_counter_ns() - started)
        next(counts.ended)
        return value

    def get(self, name: str, timeout: float | None) -> Any:
        """Read the public property or data attribute ``name`` of the service (as ``call``)."""
        return self._run(PendingCall(name), timeout, functools.partial(Get, name=name))

    def kind(self, name: str) -> Kind:
        """What ``name`` is in the service, from the server's hello, or asked once."""
        peer = self.protocol.peer
        if peer is None:
            self.wait_ready()
            peer = self.protocol.peer
            assert peer is not None
        kind = peer.kinds.get(name)
        if kind is None:
            asked = self._run(PendingCall(name), None, functools.partial(Describe, name=name))
            kind = peer.kinds[name] = Kind(asked)
        return kind

    def check_usable(self) -> None:
        """Raise at once if a call cannot start: another process's, closed or dead."""
        if self.generation != fork_generation():
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)

    def abandon(self, call_id: int) -> bool:
        """Give up on a call (its late reply is dropped); False if it had an outcome."""
        return self.protocol.abandon(call_id)

    def write_nowait(self, frame: list[Buffer]) -> bool | None:
        """Write a registered call's frame on the pipe without waiting for anything.

        True: it went whole. None: part of it went, and the rest is queued (the next
        writer, or ``flush_nowait``, finishes it). False: nothing went (the write lock
        was busy, or the socket full): try again later.
        """
        lock = self._write_lock
        try:
            if not lock.acquire(False):
                return False
            if self.broken is not None:
                raise fresh_error(self.broken)
            self.pipe.write(frame, time.monotonic())
            return True
        except WriteTimeout:
            if self.pipe.unsent_untouched():
                self.pipe.drop_unstarted()
                return False
            return None
        except _IO_ERRORS as exc:
            self._io_failed(exc, None)
            raise fresh_error(self.broken) from None  # type: ignore[arg-type]
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def flush_nowait(self) -> bool:
        """Go on writing a frame ``write_nowait`` left part-written; True once none is left."""
        lock = self._write_lock
        try:
            if not lock.acquire(False):
                return False
            if self.broken is not None:
                return True
            self.pipe.flush(time.monotonic())
            return True
        except WriteTimeout:
            return False
        except _IO_ERRORS as exc:
            self._io_failed(exc, None)
            return True
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def start_stream(self, call: PendingCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Register and send a call of a generator method (``call`` takes its items).

        Streams go on the pipe, whatever the thread: their credit and cancel frames
        follow on it.
        """
        self.check_usable()
        call_id = 0
        try:
            call_id, frame = self.protocol.start(call.method, args, kwargs, call)
            self._send(frame, None)
        except BaseException:
            if call_id:
                self.abandon(call_id)
            raise
        return call_id

    def wait_for(self, call: PendingCall, deadline: float | None) -> None:
        """Wait on the pipe until ``call`` has something (``done``), its deadline passed,
        or the connection broke."""
        self._wait_pipe(call, deadline)

    def control(self, message: Credit | Cancel) -> None:
        """Send a stream's credit or cancel; on a dead connection there is nothing to do."""
        if self.broken is not None:
            return
        frame = self.protocol.codec.encode(message)
        try:
            self._send(frame, time.monotonic() + 5.0)
        except WriteTimeout:
            pass

    def fresh_broken(self) -> PipeRPCError:
        """A fresh copy of why the connection is dead (it must be)."""
        assert self.broken is not None
        return fresh_error(self.broken)

    def read_nowait(self, ended: bool = False, spin: bool = False) -> None:
        """Read what the pipe has and settle its calls, unless a leader is reading (then
        it does): for an event loop told that the pipe, or with ``ended`` the server
        process's sentinel, is readable. With ``spin``, first spin for frames as a sync
        caller does before it sleeps, never sleeping: for an event loop with one call
        in flight, whose reply most often comes within the spin window."""
        lock = self._read_lock
        pipe = self.pipe
        try:
            if lock.acquire(False):
                if spin:
                    if pipe.spin():
                        self._hand_out(pipe)
                    return
                pipe.read_available()
                pipe.note_reply()
                self._hand_out(pipe)
                if ended:
                    raise PeerGone("peer process ended")
        except _IO_ERRORS as exc:
            self._io_failed(exc, pipe)
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass
            else:
                self._pass_lead()

    def _call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """A plain call: read in place by a thread alone on its lane, else ``_run``."""
        local = self.lanes.local
        channel = local.channel
        if channel is not None:
            return self._call_on(channel, method, args, kwargs, timeout)
        if (
            not self.protocol.pending
            and not self.pipe.ready
            and (local.main or not (local.contended or self._others_call()))
        ):
            lock = self._read_lock
            try:
                if lock.acquire(False):
                    return self._call_alone(method, args, kwargs, timeout)
            finally:
                try:
                    lock.release()
                except RuntimeError:  # this thread did not hold it
                    pass
                else:
                    if self.protocol.pending:
                        self._pass_lead()
        return self._run(PendingCall(method), timeout, None, args, kwargs)

    def _others_call(self) -> bool:
        """Do other threads call on side channels? Their calls are not in the pending
        table, so a thread other than the main one that finds channels contends too:
        it asks for one of its own on its next call."""
        if len(self.lanes):
            self.lanes.local.contended = True
            return True
        return False

    def _call_alone(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """A call by a thread alone on the pipe, holding the read lock: one thread's hot path.

        Nobody else reads the pipe, so the reply can only come to this thread: the
        call is not registered, and most often one read brings exactly its plain
        return value (``quick_result``). Anything else registers it and goes on as
        ``_run`` does. Unregistered, a call that ends early needs no undoing: its
        late reply is dropped.
        """
        if self.generation != GENERATION[0]:
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)
        deadline = None if timeout is None else time.monotonic() + timeout
        protocol = self.protocol
        call_id, frame = protocol.start_call(method, args, kwargs)
        self.lone = call_id  # in flight (``in_flight``) until it ends or is registered
        pipe = self.pipe
        ready = pipe.ready
        left: float | None = None
        failed: BaseException | None = None
        try:
            self._send(frame, deadline)
            while not ready and self.broken is None:
                if deadline is not None:
                    left = remaining(deadline)
                    if left == 0.0:  # ``_registered`` ends it as ``_run`` does
                        break
                pipe.read(left)
            if len(ready) == 1:
                value = protocol.quick_result(ready[0], call_id)
                if value is not NOT_QUICK:
                    ready.popleft()
                    return value
        except WriteTimeout:
            raise CallTimeoutError(
                f"{method}() timed out after {timeout} s waiting to send"
            ) from None
        except _IO_ERRORS as exc:
            failed = exc
        finally:
            self.lone = 0
        return self._registered(PendingCall(method), call_id, None, deadline, timeout, failed)

    def _call_on(
        self,
        channel: SideChannel,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """A call on this thread's side channel: the hot path of threads.

        The channel is this thread's alone, so its reply can only come here: as
        ``_call_alone``, the call is registered only if that reply is not a plain
        return value. With no deadline the thread sleeps on the channel's doorbell.
        A call that ends early drops the channel (nobody would read its late reply).
        """
        if self.generation != GENERATION[0]:
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)
        deadline = None if timeout is None else time.monotonic() + timeout
        protocol = self.protocol
        transport = channel.transport
        ready = transport.ready
        failed: BaseException | None = None
        call_id, frame = protocol.start_call(method, args, kwargs)
        channel.call = call_id  # in flight (``in_flight``) until it ends or is registered
        try:
            transport.write(frame, deadline)
            if not ready:
                if deadline is None and channel.doorbell >= 0:
                    # The server rings just before it writes the reply, which has most
                    # often come by the time this thread runs: read before any poll
                    # (each system call is a turn at the GIL for every calling thread).
                    os.eventfd_read(channel.doorbell)
                    transport.read_available()
                else:
                    transport.read(remaining(deadline), False)
            if len(ready) == 1:
                value = protocol.quick_result(ready[0], call_id)
                if value is not NOT_QUICK:
                    ready.popleft()
                    return value
        except WriteTimeout:
            self.lanes.drop(channel)
            raise CallTimeoutError(
                f"{method}() timed out after {timeout} s waiting to send"
            ) from None
        except _IO_ERRORS as exc:
            failed = exc
        except BaseException:
            self.lanes.drop(channel)
            raise
        finally:
            channel.call = 0
        return self._registered(PendingCall(method), call_id, channel, deadline, timeout, failed)

    def _registered(
        self,
        pending: PendingCall,
        call_id: int,
        channel: SideChannel | None,
        deadline: float | None,
        timeout: float | None,
        failed: BaseException | None,
    ) -> Any:
        """Register a call that was read in place after all, and wait for it as ``_run``
        does: its reply is not a plain return value, it has not come yet, or reading
        raised ``failed``."""
        self.protocol.register(call_id, pending)
        transport = self.pipe if channel is None else channel.transport
        try:
            if failed is not None:
                self._io_failed(failed, transport)
            if channel is None:
                self._wait_pipe(pending, deadline)
            else:
                self._wait_channel(channel, pending, deadline, rang=True)
        except BaseException:
            self._end_early(call_id, channel)
            raise
        return self._outcome(pending, call_id, channel, timeout)

    def _run(
        self,
        pending: PendingCall,
        timeout: float | None,
        make: Callable[[int], Get | Describe] | None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Register a call (``pending.method(*args, **kwargs)``, or the request ``make``
        makes), write it on its lane, and wait for its outcome."""
        if self.generation != GENERATION[0]:
            check_owner(self.generation, "client")
        if self.broken is not None:
            raise fresh_error(self.broken)
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self.lanes.local
        channel = local.channel
        if channel is None and local.contended and not local.main:
            channel = self.lanes.lane(deadline)
        if self.protocol.pending:  # another call is in flight: this thread contends
            local.contended = True
        call_id = 0
        try:  # registered inside the try: an interrupt anywhere after ends this call alone
            if make is None:
                call_id, frame = self.protocol.start(pending.method, args, kwargs or {}, pending)
            else:
                call_id, frame = self.protocol.request(make, pending)
            if channel is None:
                self._send(frame, deadline)
                self._wait_pipe(pending, deadline)
            else:
                self._send_channel(channel, frame, deadline)
                self._wait_channel(channel, pending, deadline)
        except WriteTimeout:
            self._end_early(call_id, channel)
            raise CallTimeoutError(
                f"{pending.method}() timed out after {timeout} s waiting to send"
            ) from None
        except BaseException:
            if call_id:
                self._end_early(call_id, channel)
            raise
        return self._outcome(pending, call_id, channel, timeout)

    def _outcome(
        self, pending: PendingCall, call_id: int, channel: SideChannel | None, timeout: float | None
    ) -> Any:
        """A waited-for call's value, or raise its error (or why it ended without one)."""
        if not pending.done:  # the deadline passed, or the connection broke
            self._end_early(call_id, channel)
            if not pending.settled():  # it may have been settled as it was abandoned
                if self.broken is not None:
                    raise fresh_error(self.broken)
                raise CallTimeoutError(f"{pending.method}() timed out after {timeout} s")
        if pending.ok:
            return pending.value
        raise pending.value

    def _end_early(self, call_id: int, channel: SideChannel | None) -> None:
        """A call leaves without its outcome: forget it, and drop a side channel it used."""
        self.protocol.abandon(call_id)
        if channel is not None:
            # Nobody would read its late reply: a big one would block the server's
            # write, and every other caller with it. Closing makes that write fail.
            self.lanes.drop(channel)

    def _send(self, frame: list[Buffer], deadline: float | None, fds: Sequence[int] = ()) -> None:
        """Write a registered call's frame on the pipe (under the write lock)."""
        lock = self._write_lock
        try:
            if deadline is None:
                lock.acquire()
            elif not lock.acquire(True, cast(float, remaining(deadline))):
                raise WriteTimeout("waiting to send")
            if self.broken is not None:  # checked under the lock: close() closes under it
                return
            self.pipe.write(frame, deadline, fds)
        except _IO_ERRORS as exc:
            self._io_failed(exc, None)
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def _send_channel(
        self, channel: SideChannel, frame: list[Buffer], deadline: float | None
    ) -> None:
        try:
            channel.transport.write(frame, deadline)
        except _IO_ERRORS as exc:
            self._io_failed(exc, None)

    def _wait_pipe(self, pending: PendingCall, deadline: float | None) -> None:
        """Return once ``pending`` is settled, its deadline passed, or the connection broke."""
        lock = self._read_lock
        left: float | None = None
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            led = False
            try:
                if lock.acquire(False):
                    led = True
                    self._lead(pending, deadline)
            finally:
                try:
                    lock.release()
                except RuntimeError:  # this thread did not hold it
                    pass
                else:
                    if self.protocol.pending:
                        self._pass_lead()
            if led:
                continue
            self.lanes.local.contended = True
            waiter = self._waiters.waiter
            current = pending.waiter
            if current is None:
                pending.waiter = waiter
            elif current is not waiter and getattr(current, "second", None) is not waiter:
                pending.waiter = _Both(current, waiter)  # a future's waiter stays woken too
            if not pending.done:  # settled before it could see the waiter
                waiter.sleep(_RECHECK if left is None else min(left, _RECHECK))

    def _lead(self, pending: PendingCall, deadline: float | None) -> None:
        """As the pipe's reader, read and hand out until ``pending`` is settled.

        The loop hands out frames as ``_hand_out`` does, written out: it is every call's path.
        """
        pipe = self.pipe
        ready = pipe.ready
        protocol = self.protocol
        receive = protocol.receive
        left: float | None = None
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            alone = len(protocol.pending) < 2
            if not alone:  # reading for others too: this thread contends
                self.lanes.local.contended = True
            try:
                if not ready:  # frames left by an interrupted leader go first
                    pipe.read(left, alone)
                if len(ready) > 1:  # replies of others' calls came too
                    self.lanes.local.contended = True
                while ready:  # a frame leaves ``ready`` only once its call is settled
                    receive(ready[0])
                    ready.popleft()
            except _IO_ERRORS as exc:
                self._io_failed(exc, pipe)

    def _pass_lead(self) -> None:
        """The leader left: wake one follower to read in its place."""
        if self.protocol.pending_count:  # (its callers on the hot path check first too)
            for slot in self.protocol.slots():
                waiter = slot.waiter
                if not slot.done and waiter is not None and waiter.leads:
                    waiter.wake()
                    return

    def _wait_channel(
        self, channel: SideChannel, pending: PendingCall, deadline: float | None, rang: bool = False
    ) -> None:
        """Read this thread's side channel until ``pending`` is settled or its deadline passed.

        With no deadline and a doorbell the caller sleeps on the doorbell first, at
        most once a call (the ring it took may be for a reply still being written).
        """
        transport = channel.transport
        ready = transport.ready
        receive = self.protocol.receive
        rang = rang or channel.doorbell < 0 or deadline is not None
        left: float | None = None
        # ``_hand_out`` written out: this is every call's path in a thread with a
        # channel, and the threads take turns at the GIL for each frame of it.
        while not pending.done and self.broken is None:
            if deadline is not None:
                left = remaining(deadline)
                if left == 0.0:
                    return
            try:
                if not ready:
                    if not rang:
                        rang = True
                        os.eventfd_read(channel.doorbell)
                        # The server rings just before it writes the reply, which has most
                        # often come by the time this thread runs: read before any poll
                        # (each system call is a turn at the GIL for every calling thread).
                        transport.read_available()
                    if not ready:
                        transport.read(left, False)
                while ready:  # a frame leaves ``ready`` only once its call is settled
                    receive(ready[0])
                    ready.popleft()
            except _IO_ERRORS as exc:
                self._io_failed(exc, transport)

    def _hand_out(self, transport: Transport) -> None:
        """Settle the call of each frame in ``transport.ready``, oldest first.

        A frame leaves ``ready`` only after its call is settled: an interrupt in
        between leaves it to be handed out again, which settles nothing twice.
        """
        ready = transport.ready
        receive = self.protocol.receive
        while ready:
            receive(ready[0])
            ready.popleft()

    # -- side channels ------------------------------------------------------------

    def _request(
        self,
        make: Callable[[int], OpenChannel | Channel],
        deadline: float | None,
        fds: Sequence[int] = (),
    ) -> bool:
        """Ask the server machinery for something (``make(call_id)``); True if it granted it."""
        pending = PendingCall()
        call_id, frame = self.protocol.request(make, pending)
        try:
            self._send(frame, deadline, fds)
            self._wait_pipe(pending, deadline)
        except WriteTimeout:
            self.protocol.abandon(call_id)
            return False
        except BaseException:
            self.protocol.abandon(call_id)
            raise
        if not pending.done:
            self.protocol.abandon(call_id)
            return False
        if not pending.ok and self.broken is None:
            self.lanes.ok = False  # refused: the server cannot take side channels
        return pending.ok

    # -- start, failure and close ---------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the server's hello (``spawn`` uses this to surface ``StartupError``).

        The read lock is only ever tried for a moment: a leader holding it while it
        waits for a call (the hello came long ago) must not keep this thread from
        seeing that the hello is there.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._read_lock
        while self.protocol.peer is None and self.broken is None:
            left = remaining(deadline)
            if left == 0.0:
                raise CallTimeoutError(f"no hello from the server after {timeout} s")
            try:
                if lock.acquire(True, _RECHECK) and self.protocol.peer is None:
                    self.pipe.read(_RECHECK if left is None else min(left, _RECHECK))
                    self._hand_out(self.pipe)
            except _IO_ERRORS as exc:
                self._io_failed(exc, self.pipe)
            finally:
                try:
                    lock.release()
                except RuntimeError:  # this thread did not hold it
                    pass
        if self.broken is not None:
            raise fresh_error(self.broken)

    def _io_failed(self, exc: BaseException, transport: Transport | None) -> None:
        """A read or write raised ``exc``: hand out what came before it, then break the
        connection with the error that says why."""
        if transport is not None and isinstance(exc, PeerGone):
            try:
                self._hand_out(transport)  # a last reply may have come before the end
            except (ProtocolError, StartupFailedSignal) as later:
                exc = later
        self._break(self._error_for(exc))

    def _error_for(self, exc: BaseException) -> PipeRPCError:
        if self.broken is not None:
            return self.broken
        if isinstance(exc, StartupFailedSignal):
            error = exc.message.error
            failure = StartupError(
                f"the factory failed in the child: {error!r}",
                remote_traceback=str(error.__cause__ or ""),
            )
            failure.__cause__ = error
            return failure
        if isinstance(exc, ProtocolError):
            return exc
        if isinstance(exc, PeerGone):
            return self._lost(str(exc))
        return ClientClosedError("the client was closed") if self.closed else self._lost(repr(exc))

    def connection_lost(self, reason: str) -> None:
        """Fail every pending and later call as if the peer had gone (its exit code if known)."""
        if self.broken is None and not self.closed:
            self._break(self._lost(reason))

    def _break(self, error: PipeRPCError) -> None:
        """The connection is dead: every pending call and every later call gets ``error``."""
        if self.broken is None:
            self.broken = error
            self.lanes.wake_all()  # the threads waiting on their own
        broken = self.broken
        self.protocol.fail_all(lambda: fresh_error(broken))

    def _lost(self, reason: str) -> PipeRPCError:
        """The error for a peer that went away: ``WorkerDiedError`` when we know its process."""
        if self.closed:
            return ClientClosedError("the client was closed")
        process = self._process
        if process is None:
            return ConnectionLostError(f"the connection to the server was lost: {reason}")
        exitcode = wait_exitcode(process, _EXIT_GRACE)
        pid = getattr(process, "pid", None)
        if exitcode is None:
            return ConnectionLostError(
                f"the connection to server process {pid} was lost ({reason}), "
                "but the process has not exited"
            )
        methods = tuple(dict.fromkeys(s.method for s in self.protocol.slots() if s.method))
        running = f" while running {', '.join(f'{m}()' for m in methods)}" if methods else ""
        hint = self.death_hint(exitcode)
        return WorkerDiedError(
            f"server process {pid} {describe_exitcode(exitcode)}{running}{hint}",
            exitcode=exitcode,
            stderr_tail=self.death_tail(),
            methods=methods,
        )

    def close(self) -> None:
        """Ask the server to stop, fail calls in flight (``ClientClosedError``), close the pipe."""
        if self.generation != fork_generation():
            self.close_inherited()
            return
        if self.closed:
            return
        self.closed = True
        self._say_goodbye()
        shutdown(self._conn)  # every read and write of the pipe ends now
        self._break(ClientClosedError("the client was closed"))
        if self.lanes.monitor is not None:
            self.lanes.monitor.stop()
        self._close_descriptor()
        self.pump = None  # it holds this connection: no cycle left for the collector

    def _say_goodbye(self) -> None:
        """Send ``Shutdown``, briefly: a frame an interrupted caller left is finished first."""
        lock = self._write_lock
        try:
            if lock.acquire(True, 0.5) and self.broken is None:
                self.pipe.write(self.protocol.codec.encode(Shutdown()), time.monotonic() + 0.5)
        except (PeerGone, WriteTimeout, OSError):
            pass
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass

    def _close_descriptor(self) -> None:
        """Close the pipe under both locks, so that no thread is using its number.

        A lock still held after a second means a thread stuck outside pipe_rpc's
        control: the descriptor is then left to the garbage collector.
        """
        writing, reading = self._write_lock, self._read_lock
        try:
            if writing.acquire(True, 1.0) and reading.acquire(True, 1.0):
                self._conn.close()
        finally:
            try:
                reading.release()
            except RuntimeError:  # this thread did not hold it
                pass
            try:
                writing.release()
            except RuntimeError:
                pass

    def close_inherited(self) -> None:
        """In a forked child: drop this process's copies of the descriptors, touching
        nothing the owner shares (no shutdown, no goodbye)."""
        self.closed = True
        self.broken = self.broken or ClientClosedError("the client belongs to another process")
        self._write_lock = threading.RLock()
        self._read_lock = threading.RLock()
        self._conn.close()

    @property
    def in_flight(self) -> int:
        """How many calls wait for their reply: the registered ones, and those read in
        place by a lone caller on the pipe or by a thread on its side channel."""
        quick = sum(1 for channel in self.lanes if channel.call)
        return len(self.protocol.pending) + quick + (self.lone != 0)

    @property
    def late_replies(self) -> int:
        return self.protocol.late_replies

    @property
    def monitor(self) -> PeerMonitor | None:
        """The thread watching the server's process, once there are side channels."""
        return self.lanes.monitor
