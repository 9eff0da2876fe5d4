"""``Stats`` and ``MethodStats``: frozen snapshots of a server's or a pool's counts.

attrs classes, in a module of their own: attrs takes tens of milliseconds to
import, and it is imported only when stats are first asked for.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class MethodStats:
    """One method's counts.

    Attributes:
        calls: calls that ended (answered, raised, or timed out).
        errors: calls that raised (the service's exception, or pipe_rpc's).
        timeouts: calls that ended by their timeout or a cancellation.
        in_flight: calls started and not yet ended.
        p50_us: the median latency of its recent calls, in microseconds (``None``:
            no call yet).
        p99_us: their 99th percentile.
    """

    calls: int
    errors: int
    timeouts: int
    in_flight: int
    p50_us: float | None
    p99_us: float | None


@attrs.frozen
class Stats:
    """A server's (or a pool's, summed over its children) counts at one moment.

    Attributes:
        methods: ``MethodStats`` by method name.
        starts: children started, restarts included.
        restarts: children started to replace one.
        deaths: how many children died, by reason: ``"SIGSEGV"``, ``"SIGKILL"``,
            ``"exit 3"``.

    Example::

        stats = server.stats()
        print(stats.methods["add"].calls, stats.methods["add"].p50_us)
    """

    methods: Mapping[str, MethodStats]
    starts: int
    restarts: int
    deaths: Mapping[str, int]
