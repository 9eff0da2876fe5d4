"""Resource limits for a child: ``Limits``, applied with ``resource.setrlimit``."""

from __future__ import annotations

import signal
from typing import Any

import attrs


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attribute.name} must be None or an int > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{attribute.name} must be None or > 0, got {value!r}")


@attrs.frozen
class Limits:
    """Resource limits applied in the child before the factory runs.

    Args:
        memory_bytes: the address-space limit (``RLIMIT_AS``); an allocation
            past it raises ``MemoryError`` in the child, which the caller gets.
        cpu_seconds: CPU time (``RLIMIT_CPU``); the child gets SIGXCPU at the
            limit and SIGKILL one second later, and the caller ``WorkerDiedError``.
        open_files: the number of open descriptors (``RLIMIT_NOFILE``).
        processes: processes of the child's user (``RLIMIT_NPROC``; not
            enforced by Linux for root).
    """

    memory_bytes: int | None = attrs.field(default=None, validator=_positive)
    cpu_seconds: int | None = attrs.field(default=None, validator=_positive)
    open_files: int | None = attrs.field(default=None, validator=_positive)
    processes: int | None = attrs.field(default=None, validator=_positive)

    def apply(self) -> None:
        """Set the limits on this process (the soft and the hard limit alike, but CPU)."""
        import resource

        if self.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        if self.cpu_seconds is not None:
            # Soft limit: SIGXCPU; the hard limit a second later: SIGKILL, if SIGXCPU is caught.
            resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 1))
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))
        if self.processes is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (self.processes, self.processes))

    def explain(self, exitcode: int) -> str:
        """A hint for how a child under these limits died, or ``""``."""
        if exitcode == -signal.SIGXCPU:
            return f" (probably its cpu_seconds={self.cpu_seconds} limit)"
        if exitcode == -signal.SIGKILL and self.cpu_seconds is not None:
            return f" (possibly its cpu_seconds={self.cpu_seconds} limit, or a kill)"
        if exitcode in (1, -signal.SIGKILL, -signal.SIGSEGV) and self.memory_bytes is not None:
            return f" (possibly its memory_bytes={self.memory_bytes} limit, or a kill)"
        return ""
