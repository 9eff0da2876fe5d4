"""A client typed by a ``typing.Protocol``; the implementation lives in the child.

The parent only knows the interface, ``KeyValueStore``. The class that
implements it is built in the child process, by the child's own code, and the
parent never creates one. ``Client[KeyValueStore](conn).proxy`` is typed as
the protocol, so mypy checks every remote call against it.

Run it from the repository root::

    python examples/typed_protocol.py
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Protocol

import pipe_rpc


class KeyValueStore(Protocol):
    """The interface the parent programs against."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def keys(self) -> list[str]: ...


class DictStore:
    """An implementation; it does not inherit from the protocol, it just fits it."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = value

    def keys(self) -> list[str]:
        return sorted(self._data)


if TYPE_CHECKING:
    # A static check (mypy only) that DictStore satisfies KeyValueStore.
    _conforms: type[KeyValueStore] = DictStore


def run_store(conn: Connection) -> None:
    """The child's entry point: build the implementation here and serve it."""
    pipe_rpc.serve(DictStore(), conn)


def main() -> None:
    # "spawn" starts a fresh interpreter: nothing of the parent's state is shared.
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_store, args=(child,))
    process.start()
    child.close()

    with pipe_rpc.Client[KeyValueStore](parent, process=process, timeout=10) as client:
        store = client.proxy  # typed as KeyValueStore
        store.put("b", b"2")
        store.put("a", b"1")
        print(f"get('a') = {store.get('a')!r}")
        print(f"get('missing') = {store.get('missing')!r}")
        print(f"keys() = {store.keys()}")

    process.join(timeout=10)
    print(f"child exit code: {process.exitcode}")


if __name__ == "__main__":
    main()
