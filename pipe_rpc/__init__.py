"""pipe_rpc: typed request-reply RPC to a child process over a multiprocessing Pipe."""

from ._client import Client, options
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
from ._limits import Limits
from ._process import Server, spawn
from ._server import serve

__all__ = [
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConnectionLostError",
    "Limits",
    "MethodNotFoundError",
    "PipeRPCError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "Server",
    "StartupError",
    "WorkerDiedError",
    "options",
    "serve",
    "spawn",
]
