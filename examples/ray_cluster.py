"""The same service on a Ray actor: the only change is the import.

    import pipe_rpc                      # a child process on this machine
    import pipe_rpc.ray as pipe_rpc_ray  # a Ray actor, on whatever cluster this program joined

Run in a venv with ``pip install -e '.[ray]'``. Without a cluster to join,
``pipe_rpc_ray.spawn`` starts a local one (``ray.init()``).
"""

from __future__ import annotations

import os

import pipe_rpc
import pipe_rpc.ray as pipe_rpc_ray


class Store:
    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def add(self, a: int, b: int) -> int:
        return a + b

    def get(self, key: str) -> int:
        return self.data[key]  # KeyError travels back as KeyError

    def crash(self) -> None:
        os._exit(1)

    def square(self, x: int) -> int:
        return x * x


def main() -> None:
    # pipe_rpc.spawn(Store, timeout=30.0, restart="on-failure") would run it in a child here.
    with pipe_rpc_ray.spawn(Store, timeout=30.0, restart="on-failure") as store:
        print(f"add(1, 2) = {store.add(1, 2)}")
        try:
            store.get("missing")
        except KeyError as exc:
            traced = isinstance(exc.__cause__, pipe_rpc.RemoteTraceback)
            print(f"caught KeyError: {exc} (remote traceback attached: {traced})")
        try:
            store.crash()
        except pipe_rpc.WorkerDiedError as exc:
            print(f"the actor died: {type(exc).__name__}")
        print(f"a fresh actor answers: add(2, 3) = {store.add(2, 3)}")

    pool = pipe_rpc_ray.pool(Store, size=2, timeout=30.0)
    with pool as stores:
        print(f"squares: {list(pool.map(stores.square, range(5)))}")


if __name__ == "__main__":
    main()
