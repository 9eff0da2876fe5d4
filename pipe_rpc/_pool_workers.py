"""Which child of a pool takes each call, and when a child is retired (see ``_pool``).

A call takes the ready child with the fewest calls in flight (``take``, or
``take_now`` without waiting), recorded in its ``Lease`` inside the caller's
``try``, and gives it back once (``give_back``). A child that died, reached
``max_calls_per_child`` or ``max_memory_per_child`` is *retired*: it takes no
more calls and is closed when its last call is given back, and its slot starts
another (``_pool_children``). Everything here is guarded by one lock,
``_lock`` (waited on through ``_cond``), never held while a process is started,
greeted or closed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    ProtocolError,
)
from ._pool_children import _READY, _RETIRING, Children, Lease, _Worker
from ._proxy import fresh_error

if TYPE_CHECKING:
    from concurrent.futures import Future

#: The longest a call waiting for a child sleeps before it looks again.
_LOOK_AGAIN = 0.05


def default_size() -> int:
    count: Callable[[], int | None] = getattr(os, "process_cpu_count", os.cpu_count)
    return count() or 1


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int) -> int | None:
    """The resident memory of process ``pid`` in bytes, ``None`` if it cannot be read.

    Linux: ``/proc/<pid>/statm`` (what ``VmRSS`` shows). Elsewhere: ``ps -o rss=``,
    a process per reading.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux, and the process is gone
    except (OSError, ValueError, IndexError):
        return None
    import subprocess

    try:
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=False,
        ).stdout
        return int(out.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class Workers(Children):
    """The pool's children: which one takes each call, and when one is retired (see
    ``_pool``); starting, replacing and closing them is ``Children``'s."""

    # -- dispatch -----------------------------------------------------------------

    def take(
        self, lease: Lease, deadline: float | None, limit: int | None = None
    ) -> tuple[_Worker, bool]:
        """A worker for one call, recorded in ``lease``, and whether the call had to wait.

        ``limit``: only a worker with fewer calls in flight (``map``), waiting for one.

        Raises:
            ClientClosedError: the pool is closed.
            CallTimeoutError: ``deadline`` passed with no worker to take.
            StartupError: no child runs, and a start failed while this call waited.
        """
        failures = self.failures
        waited = False
        while True:
            with self._lock:
                worker = self._pick(lease, limit)
            if worker is not None:
                if not worker.server._ended():
                    return worker, waited
                self.give_back(lease, dead=True)  # it died idle: this call never went to it
                continue
            waited = True
            self._wait(deadline, limit, failures)

    def take_now(self, lease: Lease, limit: int | None = None) -> _Worker | None:
        """``take`` without waiting: ``None`` if no worker is ready (or alive) now."""
        with self._lock:
            worker = self._pick(lease, limit)
        if worker is not None and worker.server._ended():
            self.give_back(lease, dead=True)
            return None
        return worker

    def any_ready(self, deadline: float | None) -> _Worker:
        """A ready worker to ask about the service (nothing is counted), waiting for one."""
        failures = self.failures
        while True:
            with self._lock:
                if self.closed:
                    raise ClientClosedError("the pool was closed")
                if self._ready:
                    return self._ready[0]
            self._wait(deadline, None, failures)

    def _pick(self, lease: Lease, limit: int | None) -> _Worker | None:
        """The ready worker with the fewest calls in flight, now counted as given one more
        and recorded in ``lease``."""
        if self.closed:
            raise ClientClosedError("the pool was closed")
        ready = self._ready
        if not ready:
            return None
        # Ties go to the first: a caller alone keeps one child warm (both ends spin
        # between its calls), which is about twice as fast as going round them.
        best = ready[0]
        if best.in_flight:
            for worker in ready:
                if worker.in_flight < best.in_flight:
                    best = worker
                    if not worker.in_flight:
                        break
        if limit is not None and best.in_flight >= limit:
            return None
        best.in_flight += 1
        lease.worker = best  # no call between: an interrupt finds it counted and recorded
        best.given += 1
        if self._max_calls is not None and best.given >= self._max_calls:
            self._retire(best)  # its last call: it takes no other
        return best

    def _wait(self, deadline: float | None, limit: int | None, failures: int) -> None:
        """No worker to take: do the chores, and wait a little for one."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise CallTimeoutError("no child of the pool was free before the call's timeout")
        look = _LOOK_AGAIN if left is None else min(left, _LOOK_AGAIN)
        with self._lock:
            if self.failures != failures and not self._ready and not self._starting:
                assert self.last_failure is not None
                error = fresh_error(self.last_failure)
                raise error
            hello_to_wait_for = bool(self._starting) and (limit is None or not self._ready)
        looked = self.chores(look if hello_to_wait_for else 0.0)
        with self._lock:
            if self._pick_possible(limit) or self.closed:
                return
            if not looked:
                self._cond.wait(look)  # for a call to end (map), a hello, or a start to be due

    def _pick_possible(self, limit: int | None) -> bool:
        if limit is None:
            return bool(self._ready)
        return any(worker.in_flight < limit for worker in self._ready)

    def give_back(
        self, lease: Lease, error: BaseException | None = None, dead: bool = False
    ) -> None:
        """The call holding ``lease`` ended (``error``: how it failed): count it, retire
        its worker if it is gone or over its memory, then do the chores. Nothing if the
        lease holds no worker (never taken, or given back already)."""
        worker = lease.worker
        if worker is None:
            return
        if error is not None and not dead:
            # A timeout, or a cancelled task or future, may have killed it (on_timeout="kill").
            dead = isinstance(error, ConnectionLostError | ProtocolError) or (
                (isinstance(error, CallTimeoutError) or not isinstance(error, Exception))
                and worker.server._ended()
            )
        too_big = False
        if self._max_memory is not None and not dead and worker.state is _READY:
            rss = resident_bytes(worker.pid)
            too_big = rss is not None and rss > self._max_memory
        with self._lock:
            if lease.worker is not worker:  # another thread gave it back meanwhile
                return
            lease.worker = None
            worker.in_flight -= 1  # no call between: an interrupt finds both done or neither
            if dead or too_big:
                self._retire(worker)
            elif not worker.in_flight and worker in self._retiring:
                # By operators, not method calls: no signal handler runs between them,
                # so it is never in both lists (counted and closed twice) nor in neither.
                self._drained += (worker,)
                self._retiring -= {worker}
            self._cond.notify_all()
        self.chores()

    def future_done(self, lease: Lease, future: Future[Any]) -> None:
        """``give_back`` for a submitted call, as its future completes (a done callback).

        It runs in whichever thread completes the future, maybe one a signal lands in:
        an interrupt anywhere in here still gives the lease back (a second try does
        nothing if the first got through), and one as it starts has the future call
        it again (it is added as an ``Again``)."""
        error: BaseException | None = None
        try:
            if future.cancelled():
                error = CallTimeoutError("the call was cancelled")
            else:
                error = future.exception()
        finally:
            try:
                self.give_back(lease, error)
            except BaseException:
                self.give_back(lease, error)
                raise

    def _retire(self, worker: _Worker) -> None:
        """Under the lock: ``worker`` takes no more calls, and its slot starts another.

        An interrupt may land as any step's call returns (still under the lock): the
        steps are then taken again, each skipped if it is done, so that the worker
        never ends out of ``_ready`` but still in its slot (never replaced) or in
        neither list of retired workers (never closed). (A second interrupt landing
        in that second try is beyond this.)
        """
        if worker.state is not _READY:
            return
        try:
            self._retire_steps(worker)
        except BaseException:
            self._retire_steps(worker)
            raise

    def _retire_steps(self, worker: _Worker) -> None:
        """``_retire``'s steps; the worker leaves ``_READY`` with the last."""
        if worker.state is not _READY:
            return
        if worker in self._ready:
            self._ready.remove(worker)
        slot = worker.slot
        if slot.worker is worker:
            slot.worker = None
            slot.due = 0.0
            self._waiting.append(slot)
        if worker.in_flight:
            self._retiring.add(worker)  # closed when its last call is given back
        elif worker not in self._drained:
            self._drained.append(worker)
        worker.state = _RETIRING

    def claim(self, worker: _Worker, lease: Lease) -> bool:
        """Count one call on this very worker (``broadcast``), if it is still ready, and
        record it in ``lease`` (as ``take`` does)."""
        with self._lock:
            if self.closed:
                raise ClientClosedError("the pool was closed")
            if worker.state is not _READY:
                return False
            worker.in_flight += 1
            lease.worker = worker  # no call between (see ``Lease``)
            worker.given += 1
            if self._max_calls is not None and worker.given >= self._max_calls:
                self._retire(worker)
            return True

    def notice_deaths(self) -> None:
        """Retire every ready worker whose child has ended (one poll each), then do the
        chores: a child that died idle is seen only when a call would go to it, else."""
        with self._lock:
            ready = list(self._ready)
        for worker in ready:
            if worker.server._ended():
                with self._lock:
                    self._retire(worker)
        self.chores()

    def ready_in_order(self) -> list[_Worker]:
        with self._lock:
            return [
                slot.worker
                for slot in self.slots
                if slot.worker is not None and slot.worker.state is _READY
            ]

    def pids(self) -> list[int]:
        with self._lock:
            self.wait_launches(5.0)
            return [slot.worker.pid for slot in self.slots if slot.worker is not None]
