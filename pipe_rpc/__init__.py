"""pipe_rpc: typed request-reply RPC to a child process over a multiprocessing Pipe."""

import typing as _typing

from ._client import Client
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnectionLostError,
    MethodNotFoundError,
    PipeRPCError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    StartupError,
    WorkerDiedError,
)
from ._process import Server, spawn
from ._proxy import options
from ._server import serve

if _typing.TYPE_CHECKING:
    from ._limits import Limits
    from ._pool import Pool, pool

__all__ = [
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConnectionLostError",
    "Limits",
    "MethodNotFoundError",
    "PipeRPCError",
    "Pool",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "Server",
    "StartupError",
    "WorkerDiedError",
    "options",
    "pool",
    "serve",
    "spawn",
]


def __getattr__(name: str) -> object:
    # Limits is an attrs class, and attrs takes tens of milliseconds to import: a
    # child imports this package on every start, and only needs it when given limits.
    if name == "Limits":
        from ._limits import Limits

        return Limits
    # A child imports this package on every start, and never needs the pool.
    if name in ("Pool", "pool"):
        from . import _pool

        return getattr(_pool, name)
    raise AttributeError(f"module 'pipe_rpc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
