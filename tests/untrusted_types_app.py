"""A main script whose types an untrusted child sends back: ``untrusted_types_app.py METHOD``.

The tests copy it to a temporary directory and run it as ``__main__`` (the types
must live in a script's ``__main__``, as in a user's program). Its child is
started as ``spawn()`` starts one: the factory travels by value with cloudpickle,
and the allowed types as the process's arguments. It prints ``OK <method>``
once every check passed.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import multiprocessing
import os
import pathlib
import pickle
import sys
import uuid
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

import pipe_rpc


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class NotAllowed:
    """A class of the script that is not in ``allowed_types``."""


def safe_values() -> list[object]:
    utc = datetime.UTC
    return [
        datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=utc),
        datetime.date(2024, 5, 6),
        datetime.time(7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        datetime.timedelta(days=1, microseconds=5),
        decimal.Decimal("-1.25E+7"),
        fractions.Fraction(2, 3),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        pathlib.PurePosixPath("/tmp/x"),
        pathlib.PureWindowsPath("c:/users/x"),
    ]


class Service:
    def pid(self) -> int:
        return os.getpid()

    def point(self, x: int, y: int) -> Point:
        return Point(x, y)

    def nested(self) -> dict[str, Any]:
        return {"points": [Point(1, 2), (Point(3, 4), {Point(5, 6)})], "color": Color.GREEN}

    def safe(self) -> list[object]:
        return safe_values()

    def not_allowed(self) -> list[object]:
        return [1, NotAllowed()]

    def concrete_path(self) -> object:
        return pathlib.Path("/tmp")  # a PosixPath: only the pure paths are allowed

    def raise_with_point(self) -> None:
        raise ValueError(Point(7, 8))


def child(conn: Connection, factory: bytes, allowed: tuple[type, ...]) -> None:
    pipe_rpc.serve(pickle.loads(factory)(), conn, untrusted=True, allowed_types=allowed)


def error_of(call: Any) -> BaseException | None:
    """What ``call()`` raised, if anything."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def expect_serialization_error(call: Any, *words: str) -> None:
    error = error_of(call)
    assert isinstance(error, pipe_rpc.SerializationError), repr(error)
    for word in words:
        assert word in str(error), (word, str(error))


def start(method: str, allowed: tuple[type, ...]) -> tuple[Any, pipe_rpc.Client[Service]]:
    context: Any = multiprocessing.get_context(method)
    parent_end, child_end = context.Pipe()
    process = context.Process(target=child, args=(child_end, cloudpickle.dumps(Service), allowed))
    process.start()
    child_end.close()
    client = pipe_rpc.Client[Service](
        parent_end, process=process, untrusted=True, allowed_types=allowed
    )
    return process, client


def allowed_types_come_back(method: str) -> None:
    process, client = start(method, (Point, Color, *pipe_rpc.SAFE_TYPES))
    with client:
        proxy = client.proxy
        pid = proxy.pid()
        point = proxy.point(1, 2)
        assert type(point) is Point, type(point)  # this script's own class
        assert point == Point(1, 2)
        assert proxy.nested() == {
            "points": [Point(1, 2), (Point(3, 4), {Point(5, 6)})],
            "color": Color.GREEN,
        }
        assert proxy.nested()["color"] is Color.GREEN
        values = proxy.safe()
        assert values == safe_values(), values
        assert [type(v) for v in values] == [type(v) for v in safe_values()]
        error = error_of(proxy.raise_with_point)
        assert type(error) is ValueError, repr(error)
        assert error.args == (Point(7, 8),), error.args
        expect_serialization_error(proxy.not_allowed, "NotAllowed", "not_allowed()")
        expect_serialization_error(proxy.concrete_path, "PosixPath", "concrete_path()")
        assert proxy.pid() == pid  # the child lived on
        assert process.is_alive()
    process.join(10)


def types_not_allowed_fail_their_call(method: str) -> None:
    process, client = start(method, (Point,))
    with client:
        proxy = client.proxy
        pid = proxy.pid()
        expect_serialization_error(proxy.safe, "datetime.datetime", "safe()")
        expect_serialization_error(proxy.nested, "Color", "nested()")
        assert proxy.point(3, 4) == Point(3, 4)
        assert proxy.pid() == pid
    process.join(10)


def main(method: str) -> None:
    allowed_types_come_back(method)
    types_not_allowed_fail_their_call(method)
    print(f"OK {method}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
