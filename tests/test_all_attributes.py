"""The public namespace (``pipe_rpc.__all__``) and the error hierarchy of the contract."""

from __future__ import annotations

import copy
import pickle
import types

import pytest

import pipe_rpc

CONTRACT_NAMES = {
    "spawn",
    "serve",
    "Client",
    "Server",
    "options",
    "Limits",
    "PipeRPCError",
    "RemoteError",
    "RemoteTraceback",
    "CallTimeoutError",
    "ConnectionLostError",
    "WorkerDiedError",
    "ClientClosedError",
    "SerializationError",
    "ProtocolError",
    "MethodNotFoundError",
    "StartupError",
}

# child -> its parents in the contract's tree (besides ``object``/``BaseException``).
HIERARCHY: dict[type[BaseException], tuple[type[BaseException], ...]] = {
    pipe_rpc.PipeRPCError: (Exception,),
    pipe_rpc.RemoteError: (pipe_rpc.PipeRPCError,),
    pipe_rpc.CallTimeoutError: (pipe_rpc.PipeRPCError, TimeoutError),
    pipe_rpc.ConnectionLostError: (pipe_rpc.PipeRPCError, ConnectionError),
    pipe_rpc.WorkerDiedError: (pipe_rpc.ConnectionLostError,),
    pipe_rpc.ClientClosedError: (pipe_rpc.PipeRPCError,),
    pipe_rpc.SerializationError: (pipe_rpc.PipeRPCError,),
    pipe_rpc.ProtocolError: (pipe_rpc.PipeRPCError,),
    pipe_rpc.MethodNotFoundError: (pipe_rpc.PipeRPCError, AttributeError),
    pipe_rpc.StartupError: (pipe_rpc.PipeRPCError,),
    pipe_rpc.RemoteTraceback: (Exception,),
}

# Each error built with representative arguments, and the attributes it must keep.
ERRORS: list[tuple[BaseException, dict[str, object]]] = [
    (pipe_rpc.PipeRPCError("base"), {}),
    (
        pipe_rpc.RemoteError("x", remote_type="m.E", remote_traceback="tb"),
        {"remote_type": "m.E", "remote_traceback": "tb"},
    ),
    (pipe_rpc.CallTimeoutError("add() timed out after 0.5 s"), {}),
    (pipe_rpc.ConnectionLostError("the connection was lost"), {}),
    (pipe_rpc.WorkerDiedError("x", exitcode=-9), {"exitcode": -9, "stderr_tail": ""}),
    (
        pipe_rpc.WorkerDiedError("x", exitcode=-11, stderr_tail="Fatal Python error: ...\n"),
        {"exitcode": -11, "stderr_tail": "Fatal Python error: ...\n"},
    ),
    (pipe_rpc.WorkerDiedError("server process 1 exited with code 0", exitcode=0), {"exitcode": 0}),
    (pipe_rpc.ClientClosedError("the client was closed"), {}),
    (pipe_rpc.SerializationError("argument could not be pickled"), {}),
    (pipe_rpc.ProtocolError("bad frame"), {}),
    (pipe_rpc.MethodNotFoundError("no method 'nope'"), {}),
    (pipe_rpc.StartupError("x", remote_traceback="tb"), {"remote_traceback": "tb"}),
    (pipe_rpc.RemoteTraceback("tb text"), {}),
]


def _error_id(entry: tuple[BaseException, dict[str, object]]) -> str:
    return type(entry[0]).__name__


def test_all_is_sorted() -> None:
    assert list(pipe_rpc.__all__) == sorted(pipe_rpc.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(pipe_rpc.__all__)) == len(pipe_rpc.__all__)


@pytest.mark.parametrize("name", pipe_rpc.__all__)
def test_all_names_exist(name: str) -> None:
    assert hasattr(pipe_rpc, name)


def test_public_attributes_are_in_all() -> None:
    public = {
        name
        for name, value in vars(pipe_rpc).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(pipe_rpc.__all__) == set()


def test_star_import_gives_all() -> None:
    namespace: dict[str, object] = {}
    exec("from pipe_rpc import *", namespace)
    assert {name for name in namespace if name != "__builtins__"} == set(pipe_rpc.__all__)


@pytest.mark.parametrize("name", sorted(CONTRACT_NAMES))
def test_contract_name_exported(name: str) -> None:
    assert name in pipe_rpc.__all__
    assert hasattr(pipe_rpc, name)


@pytest.mark.parametrize("name", sorted(CONTRACT_NAMES))
def test_exported_objects_claim_the_package(name: str) -> None:
    """Public objects are defined in the package (and not, say, re-exported from a dependency)."""
    module = getattr(getattr(pipe_rpc, name), "__module__", "")
    assert module == "pipe_rpc" or module.startswith("pipe_rpc.")


@pytest.mark.parametrize("error", list(HIERARCHY), ids=[e.__name__ for e in HIERARCHY])
def test_error_parents(error: type[BaseException]) -> None:
    for parent in HIERARCHY[error]:
        assert issubclass(error, parent), f"{error.__name__} is not a {parent.__name__}"


def test_error_hierarchy_is_exactly_the_contracts() -> None:
    """No error of the package is a subclass of another unless the tree says so."""
    errors = list(HIERARCHY)
    allowed: dict[type[BaseException], set[type[BaseException]]] = {}
    for error in errors:
        ancestors: set[type[BaseException]] = set()
        todo = list(HIERARCHY[error])
        while todo:
            parent = todo.pop()
            ancestors.add(parent)
            todo.extend(HIERARCHY.get(parent, ()))
        allowed[error] = ancestors
    for error in errors:
        for other in errors:
            if other is not error and issubclass(error, other):
                assert other in allowed[error], f"{error.__name__} must not be a {other.__name__}"


def test_every_exported_error_is_in_the_tree() -> None:
    exported = {
        value
        for name in pipe_rpc.__all__
        if isinstance(value := getattr(pipe_rpc, name), type) and issubclass(value, BaseException)
    }
    assert exported == set(HIERARCHY)


def test_remote_traceback_is_not_a_pipe_rpc_error() -> None:
    assert not issubclass(pipe_rpc.RemoteTraceback, pipe_rpc.PipeRPCError)


@pytest.mark.parametrize(
    ("error", "more_general"),
    [
        (pipe_rpc.CallTimeoutError("t"), TimeoutError),
        (pipe_rpc.WorkerDiedError("d", exitcode=-11), ConnectionError),
        (pipe_rpc.WorkerDiedError("d", exitcode=-11), OSError),
        (pipe_rpc.MethodNotFoundError("m"), AttributeError),
    ],
    ids=["timeout", "died-connection", "died-oserror", "method-attribute"],
)
def test_errors_caught_by_builtin_clauses(
    error: BaseException, more_general: type[BaseException]
) -> None:
    with pytest.raises(more_general):
        raise error


@pytest.mark.parametrize("entry", ERRORS, ids=[_error_id(e) for e in ERRORS])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_error_pickles_to_an_equal_error(
    entry: tuple[BaseException, dict[str, object]], protocol: int
) -> None:
    error, attributes = entry
    clone = pickle.loads(pickle.dumps(error, protocol))
    assert type(clone) is type(error)
    assert clone == error
    assert clone.args == error.args
    assert str(clone) == str(error)
    for name, value in attributes.items():
        assert getattr(clone, name) == value


@pytest.mark.parametrize("entry", ERRORS, ids=[_error_id(e) for e in ERRORS])
def test_error_keeps_its_attributes(entry: tuple[BaseException, dict[str, object]]) -> None:
    error, attributes = entry
    for name, value in attributes.items():
        assert getattr(error, name) == value
    assert copy.copy(error) == error


def test_errors_with_different_attributes_differ() -> None:
    assert pipe_rpc.WorkerDiedError("x", exitcode=-9) != pipe_rpc.WorkerDiedError("x", exitcode=1)
    assert pipe_rpc.RemoteError("x", remote_type="a.A") != pipe_rpc.RemoteError(
        "x", remote_type="b.B"
    )
    assert pipe_rpc.ProtocolError("x") != pipe_rpc.SerializationError("x")
    assert pipe_rpc.RemoteTraceback("a") != pipe_rpc.RemoteTraceback("b")


def test_remote_traceback_str_is_the_text() -> None:
    text = 'Traceback (most recent call last):\n  File "m.py", line 3, in f\nValueError: x\n'
    assert str(pipe_rpc.RemoteTraceback(text)) == text
    assert str(pickle.loads(pickle.dumps(pipe_rpc.RemoteTraceback(text)))) == text


def test_limits_is_frozen_attrs_class() -> None:
    import attrs

    limits = pipe_rpc.Limits(memory_bytes=1 << 30)
    assert attrs.has(type(limits))
    assert [f.name for f in attrs.fields(pipe_rpc.Limits)] == [
        "memory_bytes",
        "cpu_seconds",
        "open_files",
        "processes",
    ]
    assert pipe_rpc.Limits() == pipe_rpc.Limits(None, None, None, None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limits.memory_bytes = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(limits)) == limits
