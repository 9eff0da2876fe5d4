"""``pipe_rpc.ray`` without Ray: ``import pipe_rpc`` never imports Ray, and the actor side's
rules (what may be called, how an exception travels) hold in plain Python.

The Ray tests themselves are in ``tests_ray/`` and need ``pip install -e '.[dev,ray]'``.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import pipe_rpc
from pipe_rpc._messages import Kind
from pipe_rpc._ray_actor import Raised, ServiceActor

ROOT = Path(__file__).resolve().parent.parent

#: Imports every module of the package but the Ray adapter, then lists what of Ray came along.
IMPORT_CHECK = """
import pkgutil, importlib, sys
import pipe_rpc
for module in pkgutil.iter_modules(pipe_rpc.__path__):
    if module.name not in ("ray", "__main__") and not module.name.startswith("_ray_"):
        importlib.import_module("pipe_rpc." + module.name)
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def ray_modules_after(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_pipe_rpc_does_not_import_ray() -> None:
    assert ray_modules_after(IMPORT_CHECK) == "[]"


def test_the_import_check_sees_a_module_named_ray(tmp_path: Path) -> None:
    """The check above can fail: a ``ray`` imported alongside pipe_rpc is listed."""
    (tmp_path / "ray.py").write_text("")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import ray\n" + IMPORT_CHECK
    assert ray_modules_after(code) == "['ray']"


class Service:
    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self) -> None:
        raise KeyError("missing")

    def exit(self) -> None:
        sys.exit(3)

    def unpicklable_error(self) -> None:
        error = ValueError("holds a lock")
        error.lock = threading.Lock()  # type: ignore[attr-defined]
        raise error

    def two_parts(self) -> None:
        raise TwoPartError(7, "seven")

    def _private(self) -> str:
        return "private"

    label = "not callable"


class TwoPartError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


def outcome(actor: ServiceActor, name: str, *args: object) -> object:
    """What crosses back to the caller: the value, or the rebuilt exception."""
    value = pickle.loads(pickle.dumps(actor.call(name, args, {})))
    return value.rebuild() if isinstance(value, Raised) else value


def test_a_public_method_returns_its_value() -> None:
    assert outcome(ServiceActor(Service), "add", 1, 2) == 3


@pytest.mark.parametrize("name", ["_private", "__init__", "add.__globals__", "label", "nope"])
def test_only_public_callables_are_served(name: str) -> None:
    error = outcome(ServiceActor(Service), name)
    assert isinstance(error, pipe_rpc.MethodNotFoundError), error


def test_an_exception_keeps_its_type_and_the_remote_traceback() -> None:
    error = outcome(ServiceActor(Service), "fail")
    assert isinstance(error, KeyError)
    assert error.args == ("missing",)
    assert isinstance(error.__cause__, pipe_rpc.RemoteTraceback)
    text = str(error.__cause__)
    assert 'in fail\n    raise KeyError("missing")' in text
    assert "in call\n" not in text  # the actor's own frame is left out


def test_an_exception_that_will_not_rebuild_from_its_args_is_rebuilt_from_its_parts() -> None:
    error = outcome(ServiceActor(Service), "two_parts")
    assert isinstance(error, TwoPartError)
    assert (error.args, error.code) == (("7: seven",), 7)


@pytest.mark.parametrize(
    ("name", "remote_type"),
    [("exit", "builtins.SystemExit"), ("unpicklable_error", "builtins.ValueError")],
)
def test_system_exit_and_unpicklable_exceptions_become_remote_error(
    name: str, remote_type: str
) -> None:
    error = outcome(ServiceActor(Service), name)
    assert isinstance(error, pipe_rpc.RemoteError), error
    assert error.remote_type == remote_type
    assert f"in {name}\n" in error.remote_traceback


def test_a_factory_that_raises_is_reported_by_hello() -> None:
    def factory() -> Service:
        raise RuntimeError("no service today")

    actor = ServiceActor(factory)
    _pid, startup, kinds = actor.hello()
    assert kinds == {}
    assert startup is not None
    error = startup.startup_error()
    assert isinstance(error, pipe_rpc.StartupError)
    assert "RuntimeError: no service today" in str(error)
    assert "no service today" in error.remote_traceback
    assert isinstance(outcome(actor, "add", 1, 2), RuntimeError)  # nothing to call


def test_a_stream_yields_items_then_the_error() -> None:
    class Streaming:
        def numbers(self, n: int) -> object:
            yield from range(n)
            raise ValueError("done")

    items = list(ServiceActor(Streaming).stream("numbers", (3,), {}))
    assert items[:3] == [0, 1, 2]
    (last,) = items[3:]
    assert isinstance(last, Raised)
    assert isinstance(last.rebuild(), ValueError)


class Kinds:
    def plain(self) -> int:
        return 1

    async def later(self, x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    def rows(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def arows(self, n: int, closed: list[bool]) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield i
        finally:
            closed.append(True)


def test_hello_tells_the_kind_of_each_method_that_is_not_plain() -> None:
    _pid, startup, kinds = ServiceActor(Kinds).hello()
    assert startup is None
    assert kinds == {
        "later": Kind.ASYNC.value,
        "rows": Kind.GENERATOR.value,
        "arows": Kind.ASYNC_GENERATOR.value,
    }


def test_the_actor_runs_async_def_methods_and_steps_async_generators() -> None:
    actor = ServiceActor(Kinds)
    assert actor.call("later", (21,), {}) == 42
    assert list(actor.stream("rows", (3,), {})) == [0, 1, 2]
    closed: list[bool] = []
    assert list(actor.stream("arows", (3, closed), {})) == [0, 1, 2]
    assert closed == [True]
    closed.clear()
    items = actor.stream("arows", (1000, closed), {})
    assert next(items) == 0
    items.close()  # as Ray's cancel closes it: the async generator's finally runs
    assert closed == [True]
