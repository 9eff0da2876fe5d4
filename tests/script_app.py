"""A main script with a service of its own: ``script_app.py METHOD spawn|by-hand``.

The tests run it as a file, and through standard input (``python - METHOD ...``).
It prints the remote traceback of a failing call, then ``OK <method>``.

``spawn`` starts the child with ``pipe_rpc.spawn``. ``by-hand`` starts it as
``spawn()`` does (``child_main``, the factory by value), with the start wrapped
in ``main_for_children``: the step that lets a script read from standard input
start ``spawn`` and ``forkserver`` children.
"""

import multiprocessing
import os
import sys
from typing import Any

import cloudpickle

import pipe_rpc
from pipe_rpc._child import child_main
from pipe_rpc._scripts import main_for_children


class ScriptService:
    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self) -> None:
        raise ValueError("boom from the script")


def by_hand(method: str) -> tuple[Any, pipe_rpc.Client[ScriptService]]:
    context: Any = multiprocessing.get_context(method)
    parent_end, child_end = context.Pipe()
    blob = cloudpickle.dumps(ScriptService, 5)
    process = context.Process(target=child_main, args=(child_end, blob, os.getpid(), None, 1))
    with main_for_children(method):
        process.start()
    child_end.close()
    return process, pipe_rpc.Client[ScriptService](parent_end, process=process)


def main(method: str, how: str) -> None:
    if how == "spawn":
        server = pipe_rpc.spawn(ScriptService, start_method=method)  # type: ignore[arg-type]
        with server as proxy:
            show_failure(proxy)
    else:
        process, client = by_hand(method)
        with client:
            show_failure(client.proxy)
        process.join(10)
    print(f"OK {method}", flush=True)


def show_failure(proxy: ScriptService) -> None:
    assert proxy.add(1, 2) == 3
    try:
        proxy.fail()
    except ValueError as exc:
        print(exc.__cause__, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
