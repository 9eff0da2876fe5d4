"""The errors pipe_rpc raises, named by who caused them.

::

    PipeRPCError(Exception)
    ├── RemoteError              the service raised something that cannot be rebuilt here
    ├── CallTimeoutError         also a TimeoutError: the call's deadline passed
    ├── ConnectionLostError      also a ConnectionError: the peer is gone
    │   └── WorkerDiedError      our child process died (.exitcode, .stderr_tail)
    ├── ClientClosedError        this side was closed by you
    ├── SerializationError       a message could not be pickled or unpickled
    ├── ProtocolError            the peer broke the wire protocol
    ├── MethodNotFoundError      also an AttributeError: no such public method
    └── StartupError             the factory failed in the child
    RemoteTraceback(Exception)   the ``__cause__`` of a rebuilt remote exception

Every error keeps its message as its only positional argument and its other
details as attributes, so each one pickles and unpickles to an equal error.
"""

from __future__ import annotations

import signal
from typing import Any


class _Equality:
    """Errors are equal when type, args and attributes agree, so a pickle round trip is equal."""

    args: tuple[Any, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, type(self)) or type(other) is not type(self):
            return NotImplemented
        return self.args == other.args and _state(self) == _state(other)

    def __hash__(self) -> int:
        return hash((type(self), self.args))


def _state(error: object) -> dict[str, Any]:
    return {k: v for k, v in vars(error).items() if not k.startswith("__")}


class PipeRPCError(_Equality, Exception):
    """Base class of every error pipe_rpc raises itself."""


class RemoteError(PipeRPCError):
    """The service raised an exception that cannot be rebuilt in the caller.

    This happens when the exception does not pickle in the child or does not
    unpickle here, when it is a ``SystemExit`` or ``KeyboardInterrupt`` (which
    must never end the caller), or when an untrusted child sent a type that is
    not allowed.

    Attributes:
        remote_type: the qualified name of the remote exception type, e.g.
            ``"mymod.MyError"`` (``"builtins.SystemExit"`` for a builtin).
        remote_traceback: the remote traceback text.
    """

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class CallTimeoutError(PipeRPCError, TimeoutError):
    """A call did not get its reply before its deadline."""


class ConnectionLostError(PipeRPCError, ConnectionError):
    """The peer is gone: end of file, a broken pipe, or a dead process."""


class WorkerDiedError(ConnectionLostError):
    """Our child process died.

    Attributes:
        exitcode: its exit code (negative for a signal).
        stderr_tail: the last lines it wrote to its standard error (at most 4 KiB),
            ``""`` if none or if it was not started by ``spawn()``.
        methods: the names of the methods that were in flight when it died.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        stderr_tail: str = "",
        methods: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        self.methods = methods


class ClientClosedError(PipeRPCError):
    """This side was closed (``close()`` was called) before or during the call."""


class SerializationError(PipeRPCError):
    """A message could not be pickled or unpickled; nothing else went wrong."""


class ProtocolError(PipeRPCError):
    """The peer broke the wire protocol; the connection is dead."""


class MethodNotFoundError(PipeRPCError, AttributeError):
    """The name is not a public callable of the service; nothing was run."""


class StartupError(PipeRPCError):
    """The factory failed in the child; ``remote_traceback`` says where."""

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class RemoteTraceback(Exception):
    """The ``__cause__`` of a rebuilt remote exception; ``str()`` is the remote traceback."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, type(self)) or type(other) is not type(self):
            return NotImplemented
        return bool(self.args == other.args)

    def __hash__(self) -> int:
        return hash(self.args)


def describe_exitcode(exitcode: int | None) -> str:
    """Say in words how a process ended: ``"killed by SIGSEGV"``, ``"exited with code 0"``."""
    if exitcode is None:
        return "ended for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"
