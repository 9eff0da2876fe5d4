"""A proxy that tells the truth (contract section 3b): attributes, the main guard,
errors that say what happened, and open files refused as values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import pytest

import pipe_rpc
from tests.services import StartMethod

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]


class Store:
    label = "store"

    def __init__(self) -> None:
        self.count = 0
        self.nothing: int | None = None
        self.items: dict[str, int] = {}

    @property
    def size(self) -> int:
        return len(self.items)

    def put(self, key: str, value: int) -> None:
        self.items[key] = value
        self.count += 1

    def opened(self, path: str, mode: str) -> IO[Any]:
        return open(path, mode)

    def length(self, handle: object) -> int:
        return 0

    def crash(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("method", METHODS)
def test_properties_and_data_attributes_read_their_current_value(method: StartMethod) -> None:
    with pipe_rpc.spawn(Store, start_method=method) as store:
        assert store.count == 0
        assert store.size == 0
        assert store.nothing is None
        assert store.label == "store"
        store.put("a", 1)
        store.put("b", 2)
        assert store.count + 1 == 3  # an int, not a method
        assert store.size == 2
        assert store.items == {"a": 1, "b": 2}
        with pytest.raises(AttributeError):
            store.count = 5


def test_a_name_the_hello_did_not_list_is_asked_once() -> None:
    with pipe_rpc.spawn(Store, start_method="fork") as store:
        store.put("a", 1)
        assert not hasattr(store, "_items")  # answered locally
        with pytest.raises(AttributeError, match="only the public names"):
            store._items  # type: ignore[attr-defined]  # noqa: B018
        with pytest.raises(pipe_rpc.MethodNotFoundError):
            store.missing()  # type: ignore[attr-defined]


def test_a_private_name_called_by_name_says_only_public_methods_are_served() -> None:
    server = pipe_rpc.spawn(Store, start_method="fork")
    with server:
        client = server._handle.child.client  # type: ignore[union-attr]
        with pytest.raises(pipe_rpc.MethodNotFoundError, match="only public methods"):
            client.call("_private")


def test_worker_died_error_names_the_methods_in_flight() -> None:
    with pipe_rpc.spawn(Store, start_method="fork") as store:
        with pytest.raises(pipe_rpc.WorkerDiedError) as raised:
            store.crash()
        assert raised.value.methods == ("crash",)
        assert "while running crash()" in str(raised.value)


@pytest.mark.parametrize("mode", ["r", "rb"])
def test_open_files_are_refused_as_results_and_as_arguments(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("contents")
    with pipe_rpc.spawn(Store, start_method="fork") as store:
        with pytest.raises(pipe_rpc.SerializationError, match=r"open file|cannot pickle"):
            store.opened(str(path), mode)
        with open(path, mode) as handle, pytest.raises(pipe_rpc.SerializationError):
            store.length(handle)
        assert store.count == 0  # still answering


def test_a_result_that_will_not_pickle_names_its_method() -> None:
    with (
        pipe_rpc.spawn(Store, start_method="fork") as store,
        pytest.raises(pipe_rpc.SerializationError, match=r"opened\(\)"),
    ):
        store.opened(__file__, "rb")


def test_entering_a_closed_server_raises() -> None:
    server = pipe_rpc.spawn(Store, start_method="fork")
    server.close()
    with pytest.raises(pipe_rpc.ClientClosedError), server:
        pass


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_script_without_the_main_guard_is_told_how_to_fix_it(method: str, tmp_path: Path) -> None:
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import pipe_rpc

            class Calculator:
                def add(self, a: int, b: int) -> int:
                    return a + b

            with pipe_rpc.spawn(Calculator, start_method={method!r}) as calc:
                print(calc.add(1, 2))
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    error = next(line for line in last if line.startswith("pipe_rpc._errors.StartupError"))
    assert "starts a child when it is imported" in error
    assert str(script) in error
    assert 'if __name__ == "__main__":' in result.stderr
