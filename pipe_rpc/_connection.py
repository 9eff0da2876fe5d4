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

Where it lives. ``Connection`` is one object built in layers, each a module:
``_ending`` (the shared state, breaking and closing), ``_reading`` (waiting and
leading), ``_calling`` (a registered call's life and the writes), and this one
(the entry points and the calls read in place). ``_pending`` holds
``PendingCall`` and the waiters.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from time import perf_counter_ns
from typing import Any

from ._calling import Calling
from ._codec import Codec
from ._ending import IO_ERRORS
from ._errors import (
    CallTimeoutError,
    PipeRPCError,
)
from ._lanes import SideChannel, SideChannels
from ._liveness import (
    GENERATION,
    HasSentinel,
    PeerMonitor,
    check_owner,
    fork_generation,
    register_holder,
)
from ._messages import Describe, Get, Kind
from ._pending import PendingCall, Waiters
from ._protocol import NOT_QUICK, ClientProtocol
from ._proxy import fresh_error
from ._stats import ERROR, TIMEOUT, Counters
from ._transport import (
    PeerGone,
    Transport,
    WriteTimeout,
    enlarge_buffers,
    is_unix_stream,
    remaining,
)


class Connection(Calling):
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
        self._waiters = Waiters()
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
        # ``Counters.begin`` and ``end``, written out.
        counts = None if counters is None else counters.methods.get(method) or counters.of(method)
        started = 0
        try:
            if counts is not None:
                next(counts.started)  # the first call in the ``try``: counted only inside it
                started = perf_counter_ns()
            if self.generation != GENERATION[0]:  # ``check_usable``, written out
                check_owner(self.generation, "client")
            if self.broken is not None:
                raise fresh_error(self.broken)
            # The lane: this thread's side channel, the pipe alone, or the pipe shared.
            local = self.lanes.local
            channel = local.channel
            if channel is not None:
                value = self._call_on(channel, method, args, kwargs, timeout)
            elif (
                not self.protocol.pending
                and not self.pipe.ready
                and (local.main or not (local.contended or self._others_call()))
            ):
                value = self._call_alone(method, args, kwargs, timeout)
            else:
                value = self._run(PendingCall(method), timeout, None, args, kwargs)
        except CallTimeoutError:
            if counts is not None:
                next(counts.ended)  # first: see ``MethodCounts.note``
                counts.note(started, TIMEOUT)
            raise
        except BaseException:
            if counts is not None:
                next(counts.ended)
                counts.note(started, ERROR)
            raise
        if counts is not None:
            next(counts.ended)  # before the latency: an interrupt after it loses only that
            counts.latencies.append(perf_counter_ns() - started)
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

    def fresh_broken(self) -> PipeRPCError:
        """A fresh copy of why the connection is dead (it must be)."""
        assert self.broken is not None
        return fresh_error(self.broken)

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
        """A call by a thread alone on the pipe: one thread's hot path.

        It takes the read lock without waiting (if another thread just took it, the
        call goes as ``_run``). Nobody else reads the pipe, so the reply can only
        come to this thread: the call is not registered, and most often one read
        brings exactly its plain return value (``quick_result``). Anything else
        registers it and goes on as ``_run`` does. Unregistered, a call that ends
        early needs no undoing: its late reply is dropped.
        """
        lock = self._read_lock
        try:
            if not lock.acquire(False):
                return self._run(PendingCall(method), timeout, None, args, kwargs)
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
            except IO_ERRORS as exc:
                failed = exc
            finally:
                self.lone = 0
            return self._registered(PendingCall(method), call_id, None, deadline, timeout, failed)
        finally:
            try:
                lock.release()
            except RuntimeError:  # this thread did not hold it
                pass
            else:
                if self.protocol.pending:  # registered calls of other threads wait
                    self._pass_lead()

    def _call_on(
        self,
        channel: SideChannel,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """A call on this thread's own side channel, read in place as ``_call_alone``'s:
        the hot path of threads. With no deadline the thread sleeps on the doorbell.
        A call that ends early drops the channel (nobody would read its late reply)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        protocol = self.protocol
        transport = channel.transport
        ready = transport.ready
        failed: BaseException | None = None
        call_id, frame = protocol.start_call(method, args, kwargs)
        channel.call = call_id  # in flight (``in_flight``) until it ends or is registered
        try:
            transport.write(frame, deadline)
            if deadline is None and channel.doorbell >= 0:  # (``ready`` is empty here)
                # The server rings just before it writes the reply, which has most often
                # come by now: read before any poll (each system call is a turn at the GIL).
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
        except IO_ERRORS as exc:
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
