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
    from ._aio import acall, aspawn, astream, submit
    from ._limits import Limits
    from ._pool import Pool, pool
    from ._safe_types import SAFE_TYPES
    from ._stats_types import MethodStats, Stats

__all__ = [  # noqa: RUF022 - in plain sorted order, constants among the rest
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConnectionLostError",
    "Limits",
    "MethodNotFoundError",
    "MethodStats",
    "PipeRPCError",
    "Pool",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SAFE_TYPES",
    "SerializationError",
    "Server",
    "StartupError",
    "Stats",
    "WorkerDiedError",
    "acall",
    "aspawn",
    "astream",
    "options",
    "pool",
    "serve",
    "spawn",
    "submit",
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
    if name in ("acall", "aspawn", "astream", "submit"):  # asyncio: never in a child
        from . import _aio

        value = globals()[name] = getattr(_aio, name)  # the next look finds it at once
        return value
    if name in ("Stats", "MethodStats"):  # attrs classes: imported when first used
        from . import _stats_types

        return getattr(_stats_types, name)
    if name == "SAFE_TYPES":  # imports pathlib, decimal and more: only for untrusted children
        from ._safe_types import SAFE_TYPES

        return SAFE_TYPES
    raise AttributeError(f"module 'pipe_rpc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
