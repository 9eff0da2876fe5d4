"""``untrusted=True`` with types of the user's own (contract 3c): they travel by reference.

The types must live in a main script, as in a user's program, so each test runs
``tests/untrusted_types_app.py``, copied out of the package, as a script of its
own; it prints ``OK <method>`` once all of its checks passed.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import pathlib
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import pipe_rpc
from pipe_rpc._by_reference import ByReference
from pipe_rpc._untrusted import UntrustedDataError, allowed_globals, restricted_loads

METHODS = ["fork", "forkserver", "spawn"]
APP = Path(__file__).resolve().parent / "untrusted_types_app.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_script_types_come_back_by_reference_and_others_fail_their_call(
    method: str, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    shutil.copy(APP, script)
    done = subprocess.run(
        [sys.executable, str(script), method],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"OK {method}"


def test_safe_types_is_a_tuple_of_the_stdlib_value_types() -> None:
    assert type(pipe_rpc.SAFE_TYPES) is tuple
    assert set(pipe_rpc.SAFE_TYPES) == {
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        decimal.Decimal,
        fractions.Fraction,
        uuid.UUID,
        pathlib.PurePosixPath,  # in pathlib._local from Python 3.13
        pathlib.PureWindowsPath,
    }


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


def test_enum_members_round_trip_by_reference() -> None:
    table = allowed_globals([Level])
    data = ByReference(table).dumps([Level.LOW, {"x": Level.HIGH}], what="the result")
    result = restricted_loads(data, allowed=table)
    assert result[0] is Level.LOW
    assert result[1]["x"] is Level.HIGH


def call_pickle(module: str, name: str, args: tuple[object, ...]) -> bytes:
    """A pickle of ``module.name(*args)``, the arguments as protocol 2 writes them."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, 2)[2:-1] + b"R."


@pytest.mark.parametrize(
    ("module", "name", "args"),
    [
        ("fractions", "Fraction", (3**200_000, 7)),  # a gcd of 300 000-bit ints
        ("decimal", "Decimal", (7**100_000,)),  # an int turned into decimal digits
        ("decimal", "Decimal", ((0, (1,) * 10, 0),)),  # only str and int, as pickled
    ],
    ids=["fraction-huge-int", "decimal-huge-int", "decimal-tuple"],
)
def test_safe_numbers_refuse_arguments_of_unbounded_cost(
    module: str, name: str, args: tuple[object, ...]
) -> None:
    table = allowed_globals(pipe_rpc.SAFE_TYPES)
    assert restricted_loads(call_pickle(module, name, ("7",)), allowed=table) == 7
    with pytest.raises(UntrustedDataError, match="may not call"):
        restricted_loads(call_pickle(module, name, args), allowed=table)


def test_an_enum_value_costly_to_hash_is_refused() -> None:
    table = allowed_globals([Level])
    shared: tuple[object, ...] = ()
    for _ in range(30):
        shared = (shared, shared)  # hashing it visits 2**30 leaves
    assert restricted_loads(call_pickle(__name__, "Level", (2,)), allowed=table) is Level.HIGH
    with pytest.raises(UntrustedDataError, match="too costly"):
        restricted_loads(call_pickle(__name__, "Level", (shared,)), allowed=table)


def test_a_datetime_is_refused_by_reference_unless_allowed() -> None:
    value = [datetime.date(2024, 1, 2)]
    with pytest.raises(
        pipe_rpc.SerializationError,
        match=r"the result of f\(\) holds type datetime\.date, which is not in allowed_types",
    ):
        ByReference(allowed_globals()).dumps(value, what="the result of f()")
    table = allowed_globals([datetime.date])
    assert restricted_loads(ByReference(table).dumps(value, what="x"), allowed=table) == value
