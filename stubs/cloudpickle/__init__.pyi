"""Stubs for the parts of cloudpickle (>= 3.0) that pipe_rpc and its tools use."""

import pickle
from collections.abc import Callable
from pickle import load as load
from pickle import loads as loads
from types import ModuleType
from typing import Any, TypeAlias

from _typeshed import SupportsWrite

__all__ = [
    "CloudPickler",
    "Pickler",
    "__version__",
    "dump",
    "dumps",
    "load",
    "loads",
    "register_pickle_by_value",
    "unregister_pickle_by_value",
]

__version__: str

DEFAULT_PROTOCOL: int

_BufferCallback: TypeAlias = Callable[[pickle.PickleBuffer], Any] | None

class Pickler(pickle.Pickler):
    """A pickler that also pickles lambdas, closures, and classes and functions of ``__main__``."""

    def __init__(
        self,
        file: SupportsWrite[bytes],
        protocol: int | None = None,
        buffer_callback: _BufferCallback = None,
    ) -> None: ...
    def dump(self, obj: Any) -> None: ...
    def reducer_override(self, obj: Any) -> Any: ...

CloudPickler = Pickler

def dumps(
    obj: Any, protocol: int | None = None, buffer_callback: _BufferCallback = None
) -> bytes: ...
def dump(
    obj: Any,
    file: SupportsWrite[bytes],
    protocol: int | None = None,
    buffer_callback: _BufferCallback = None,
) -> None: ...
def register_pickle_by_value(module: ModuleType) -> None: ...
def unregister_pickle_by_value(module: ModuleType) -> None: ...
def list_registry_pickle_by_value() -> set[str]: ...
