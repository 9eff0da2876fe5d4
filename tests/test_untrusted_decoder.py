"""The restricted unpickler: plain data and allowed types decode, everything else is refused.

Gadget tests check two things besides the error: the marker file a gadget
would create does not exist, and ``sys.modules`` gained no keys (nothing was
imported while decoding).
"""

from __future__ import annotations

import contextvars
import copyreg
import os
import pickle
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipe_rpc._untrusted import UntrustedDataError, allowed_globals, restricted_loads

# Hypothesis must not write a database into the repository.
_SETTINGS = settings(database=None, deadline=None)

PLAIN = allowed_globals()
PROTOCOLS = [2, 3, 4, 5]


# -- allowed user types (module level so that pickle finds them) ------------


@attrs.frozen
class FrozenPoint:
    x: int
    y: tuple[float, ...]


class PlainRecord:
    """A class whose state is its ``__dict__``."""

    def __init__(self, name: str, items: list[Any]) -> None:
        self.name = name
        self.items = items

    def __eq__(self, other: object) -> bool:
        return type(other) is PlainRecord and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]


class Appender:
    """A class whose class-level ``append``/``add`` would touch a file."""

    @classmethod
    def append(cls, path: str) -> None:
        Path(path).touch()

    @classmethod
    def add(cls, path: str) -> None:
        Path(path).touch()


# -- gadgets ----------------------------------------------------------------


class SystemGadget:
    """Pickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class PopenGadget:
    """Pickles as ``subprocess.Popen(argv)``."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.Popen, (self.argv,))


# -- hand-written pickles -----------------------------------------------------

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
PROTO5 = b"\x80\x05"


def short_str(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    data = text.encode()
    assert len(data) < 256
    return b"\x8c" + bytes([len(data)]) + data


def long_str(text: str) -> bytes:
    """BINUNICODE (works from protocol 1 on)."""
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL module.name (protocol 4+)."""
    return short_str(module) + short_str(name) + b"\x93"


def text_global(module: str, name: str) -> bytes:
    """GLOBAL module.name (any protocol)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def long1(value: int) -> bytes:
    """LONG1."""
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def assert_rejected(
    data: bytes, marker: Path | None = None, allowed: Any = PLAIN
) -> UntrustedDataError:
    """``data`` raises UntrustedDataError, creates no marker and imports nothing."""
    before = set(sys.modules)
    with pytest.raises(UntrustedDataError) as info:
        restricted_loads(data, allowed=allowed)
    assert set(sys.modules) - before == set()
    if marker is not None:
        assert not marker.exists()
    return info.value


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


# -- round trips ----------------------------------------------------------------


def sample_data() -> dict[str, Any]:
    return {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 255, 2**31, -(2**63), 2**200, -(2**1000)],
        "floats": [0.0, -0.0, 1.5, float("inf"), -1e300],
        "complex": [1 + 2j, complex(0, -3.5), complex(float("inf"), 0)],
        "str": ["", "text", "ünïcødé \U0001f600", "x" * 70_000],
        "bytes": [b"", b"\x00\xff", bytes(range(256)), b"y" * 70_000],
        "bytearray": [bytearray(), bytearray(b"\x00abc"), bytearray(70_000)],
        "set": {1, "two", (3, 4), frozenset({5})},
        "empty": [[], (), {}, set(), frozenset(), "", b"", bytearray()],
        "frozenset": frozenset({1, frozenset({2, (3,)})}),
        "nested": {"a": [1, (2, [3, {"b": (4,)}])], (1, "k"): {frozenset(): []}},
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4, 5)],
    }


def assert_same(expected: object, actual: object) -> None:
    """Equal, and of the same type all the way down (sets compared by equality only)."""
    assert type(actual) is type(expected)
    if isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple)
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual, strict=True):
            assert_same(e, a)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert list(actual) == list(expected)
        for key, value in expected.items():
            assert_same(value, actual[key])
    else:
        assert actual == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_round_trips_with_types_kept(protocol: int) -> None:
    value = sample_data()
    data = pickle.dumps(value, protocol=protocol)
    before = set(sys.modules)
    result = restricted_loads(data, allowed=PLAIN)
    assert set(sys.modules) - before == set()
    assert_same(value, result)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_round_trips_from_bytearray_and_memoryview(protocol: int) -> None:
    value = sample_data()
    data = pickle.dumps(value, protocol=protocol)
    assert restricted_loads(bytearray(data), allowed=PLAIN) == value
    assert restricted_loads(memoryview(b"head" + data)[4:], allowed=PLAIN) == value


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cloudpickled_plain_data_round_trips(protocol: int) -> None:
    value = sample_data()
    assert restricted_loads(cloudpickle.dumps(value, protocol=protocol), allowed=PLAIN) == value


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recursive_and_shared_structures_keep_their_identity(protocol: int) -> None:
    loop: list[Any] = []
    loop.append(loop)
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    shared = [1, 2]
    result = restricted_loads(
        pickle.dumps([loop, mapping, shared, shared], protocol=protocol), allowed=PLAIN
    )
    assert result[0][0] is result[0]
    assert result[1]["self"] is result[1]
    assert result[2] is result[3]
    assert result[2] == [1, 2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_tuples_decode_on_a_bigger_stack_with_the_same_result(protocol: int) -> None:
    value = [(i, str(i), (i,)) for i in range(20_000)]  # could nest 40_000 deep, for all we know
    assert restricted_loads(pickle.dumps(value, protocol=protocol), allowed=PLAIN) == value


def test_out_of_band_buffers_are_passed_through() -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(
        [pickle.PickleBuffer(b"out of band")], protocol=5, buffer_callback=buffers.append
    )
    result = restricted_loads(data, allowed=PLAIN, buffers=buffers)
    assert bytes(result[0]) == b"out of band"
    assert_rejected(data)  # no buffers given


_HASHABLE_LEAVES: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_HASHABLES: st.SearchStrategy[Any] = st.recursive(
    _HASHABLE_LEAVES,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)
PLAIN_DATA: st.SearchStrategy[Any] = st.recursive(
    _HASHABLE_LEAVES | st.binary(max_size=20).map(bytearray),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_HASHABLES, inner, max_size=4)
        | st.sets(_HASHABLES, max_size=4)
        | st.frozensets(_HASHABLES, max_size=4)
    ),
    max_leaves=25,
)


@_SETTINGS
@given(value=PLAIN_DATA, protocol=st.sampled_from(PROTOCOLS))
def test_any_plain_data_round_trips(value: Any, protocol: int) -> None:
    assert restricted_loads(pickle.dumps(value, protocol=protocol), allowed=PLAIN) == value


@_SETTINGS
@given(value=PLAIN_DATA, protocol=st.sampled_from(PROTOCOLS), edit=st.data())
def test_a_corrupted_pickle_decodes_or_raises_untrusted_data_error(
    value: Any, protocol: int, edit: st.DataObject
) -> None:
    data = bytearray(pickle.dumps(value, protocol=protocol))
    position = edit.draw(st.integers(0, len(data) - 1))
    data[position] = edit.draw(st.integers(0, 255))
    try:
        restricted_loads(data, allowed=PLAIN)
    except UntrustedDataError:
        pass


@_SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_decode_or_raise_untrusted_data_error(data: bytes) -> None:
    try:
        restricted_loads(data, allowed=PLAIN)
    except UntrustedDataError:
        pass


# -- the table ------------------------------------------------------------------


def test_allowed_globals_without_types_holds_only_the_chosen_builtins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = allowed_globals()
    assert set(table) == {
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "bytes"),
        ("__builtin__", "complex"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("__builtin__", "bytearray"),
        ("__builtin__", "bytes"),
        ("_codecs", "encode"),
    }
    for real in (complex, set, frozenset):
        assert table[("builtins", real.__name__)] is real
        assert table[("__builtin__", real.__name__)] is real
    for key in [("builtins", "bytearray"), ("builtins", "bytes"), ("_codecs", "encode")]:
        assert not isinstance(table[key], type)  # restricted stand-ins, not the real ones
    assert capsys.readouterr() == ("", "")


def test_allowed_globals_is_read_only() -> None:
    table = cast(Any, allowed_globals())
    with pytest.raises(TypeError):
        table[("os", "system")] = os.system


def test_allowing_plain_types_changes_nothing() -> None:
    assert dict(allowed_globals([bytes, bytearray, dict, int])) == dict(allowed_globals())


def test_allowed_globals_refuses_what_is_not_a_class() -> None:
    with pytest.raises(TypeError, match="allowed types must be classes"):
        allowed_globals(cast(Any, [os.system]))


def test_an_immutable_allowed_type_resolves_to_itself() -> None:
    table = allowed_globals([ValueError])
    assert table[("builtins", "ValueError")] is ValueError
    assert table[("exceptions", "ValueError")] is ValueError  # its protocol-2 name
    error = restricted_loads(pickle.dumps(ValueError("bad", 3), protocol=2), allowed=table)
    assert type(error) is ValueError
    assert error.args == ("bad", 3)


# -- allowed user types -------------------------------------------------------------

USER_VALUES = [
    FrozenPoint(1, (2.5, -1.0)),
    PlainRecord("rec", [1, {"k": (2, 3)}, FrozenPoint(0, ())]),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", USER_VALUES, ids=lambda v: type(v).__name__)
def test_allowed_user_type_round_trips(value: object, protocol: int) -> None:
    allowed = allowed_globals([FrozenPoint, PlainRecord])
    for data in (
        pickle.dumps(value, protocol=protocol),
        cloudpickle.dumps(value, protocol=protocol),
    ):
        result = restricted_loads(data, allowed=allowed)
        assert type(result) is type(value)
        assert result == value


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", USER_VALUES, ids=lambda v: type(v).__name__)
def test_user_type_is_rejected_unless_allowed(value: object, protocol: int) -> None:
    error = assert_rejected(pickle.dumps(value, protocol=protocol))
    assert str(error) == (
        f"untrusted data may not load global '{__name__}.{type(value).__qualname__}'"
    )


def test_allowing_one_user_type_does_not_allow_another() -> None:
    allowed = allowed_globals([FrozenPoint])
    assert restricted_loads(pickle.dumps(FrozenPoint(1, ())), allowed=allowed) == FrozenPoint(1, ())
    assert_rejected(pickle.dumps(PlainRecord("r", [])), allowed=allowed)


@pytest.mark.parametrize(
    "state",
    [
        # BUILD with a (None, slotstate) state is setattr(inst, name, value) ...
        b"N}" + short_str("pwned") + b"K\x01s\x86",
        # ... and with a dict state it writes into inst.__dict__.
        b"}" + short_str("pwned") + b"K\x01s",
    ],
    ids=["slotstate", "dict-state"],
)
def test_build_cannot_change_an_allowed_class(state: bytes) -> None:
    allowed = allowed_globals([PlainRecord])
    before = dict(vars(PlainRecord))
    data = PROTO4 + stack_global(__name__, "PlainRecord") + state + b"b."
    assert_rejected(data, allowed=allowed)
    assert not hasattr(PlainRecord, "pwned")
    assert dict(vars(PlainRecord)) == before


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "set"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    ],
)
def test_build_cannot_change_an_allowed_builtin(module: str, name: str) -> None:
    data = PROTO4 + stack_global(module, name) + b"N}" + short_str("pwned") + b"K\x01s\x86b."
    assert_rejected(data)
    assert not hasattr(PLAIN[(module, name)], "pwned")


UNIT: contextvars.ContextVar[str] = contextvars.ContextVar("UNIT", default="none")


class Measure:
    """Records the context variable ``UNIT`` when it is unpickled."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.unit = ""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.unit = UNIT.get()


def test_allowed_types_see_the_callers_context_variables_on_any_stack() -> None:
    allowed = allowed_globals([Measure])
    token = UNIT.set("metres")
    try:
        for count in (1, 20_000):  # decoded on this thread, then on a helper thread
            result = restricted_loads(
                pickle.dumps([(Measure(i),) for i in range(count)]), allowed=allowed
            )
            assert {item[0].unit for item in result} == {"metres"}
    finally:
        UNIT.reset(token)


@pytest.mark.parametrize("opcode", ["APPEND", "ADDITEMS"])
def test_container_opcodes_cannot_call_methods_of_an_allowed_class(
    marker: Path, opcode: str
) -> None:
    # APPEND calls obj.append(item) and ADDITEMS obj.add(item) on whatever is
    # on the stack; on the real class these would be its classmethods.
    cls = PROTO4 + stack_global(__name__, "Appender")
    path = short_str(str(marker))
    data = cls + path + b"a." if opcode == "APPEND" else cls + b"(" + path + b"\x90."
    assert_rejected(data, marker, allowed_globals([Appender]))
    pickle.loads(data)  # the same bytes with the stock unpickler
    assert marker.exists()


def test_a_pickled_allowed_class_decodes_to_a_stand_in_that_builds_it() -> None:
    allowed = allowed_globals([PlainRecord])
    stand_in = restricted_loads(pickle.dumps(PlainRecord), allowed=allowed)
    assert stand_in is not PlainRecord
    record = stand_in("r", [1])
    assert type(record) is PlainRecord
    assert record == PlainRecord("r", [1])


# -- gadgets ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, *PROTOCOLS])
def test_os_system_gadget_is_rejected(marker: Path, protocol: int) -> None:
    data = pickle.dumps(SystemGadget(touch_command(marker)), protocol=protocol)
    error = assert_rejected(data, marker)
    assert str(error) == f"untrusted data may not load global '{os.system.__module__}.system'"


@pytest.mark.parametrize("protocol", [0, *PROTOCOLS])
def test_subprocess_popen_gadget_is_rejected(marker: Path, protocol: int) -> None:
    data = pickle.dumps(PopenGadget(["touch", str(marker)]), protocol=protocol)
    error = assert_rejected(data, marker)
    # Below protocol 3 pickle writes the Python 2 name (fix_imports).
    module = "subprocess" if protocol >= 3 else "commands"
    assert str(error) == f"untrusted data may not load global '{module}.Popen'"


def test_hand_written_os_system_global_is_rejected_with_its_name(marker: Path) -> None:
    data = text_global("os", "system") + b"(S'" + touch_command(marker).encode() + b"'\ntR."
    error = assert_rejected(data, marker)
    assert str(error) == "untrusted data may not load global 'os.system'"


def test_getattr_import_gadget_with_text_globals_is_rejected(marker: Path) -> None:
    # getattr(__import__('os'), 'system')('touch MARKER')
    data = (
        text_global("__builtin__", "getattr")
        + b"("
        + text_global("__builtin__", "__import__")
        + b"(S'os'\ntRS'system'\ntR(S'"
        + touch_command(marker).encode()
        + b"'\ntR."
    )
    error = assert_rejected(data, marker)
    assert str(error) == "untrusted data may not load global '__builtin__.getattr'"


def test_import_gadget_with_stack_global_is_rejected(marker: Path) -> None:
    # builtins.__import__('os').system is unreachable without getattr; the
    # first global is already refused.
    data = (
        PROTO4
        + stack_global("builtins", "getattr")
        + stack_global("builtins", "__import__")
        + short_str("os")
        + b"\x85R"
        + short_str("system")
        + b"\x86R"
        + short_str(touch_command(marker))
        + b"\x85R."
    )
    error = assert_rejected(data, marker)
    assert str(error) == "untrusted data may not load global 'builtins.getattr'"


@pytest.mark.parametrize(
    "qualified",
    [
        "builtins.getattr",
        "builtins.__import__",
        "builtins.eval",
        "builtins.exec",
        "builtins.compile",
        "builtins.open",
        "builtins.type",
        "builtins.object",
        "builtins.setattr",
        "builtins.globals",
        "builtins.breakpoint",
        "builtins.memoryview",
        "os.system",
        "posix.system",
        "os.execv",
        "subprocess.Popen",
        "subprocess.run",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
        "functools.partial",
        "operator.attrgetter",
        "codecs.encode",
        "_codecs.decode",
        "_codecs.lookup",
        "pickle.loads",
        "importlib.import_module",
        "__builtin__.eval",
        "__builtin__.getattr",
    ],
)
def test_dangerous_globals_are_rejected_by_name(marker: Path, qualified: str) -> None:
    module, name = qualified.split(".", 1)
    call = short_str(touch_command(marker)) + b"\x85R."
    for data in (
        PROTO4 + stack_global(module, name) + call,
        PROTO2 + text_global(module, name) + long_str(touch_command(marker)) + b"\x85R.",
    ):
        error = assert_rejected(data, marker)
        assert str(error) == f"untrusted data may not load global '{qualified}'"


@pytest.mark.parametrize("module", ["this", "antigravity"])
def test_a_module_not_yet_imported_stays_unimported(module: str) -> None:
    assert module not in sys.modules
    for data in (
        PROTO4 + stack_global(module, "s") + b".",
        text_global(module, "s") + b".",
        b"(i" + module.encode() + b"\nthing\n.",  # INST
    ):
        assert_rejected(data)
        assert module not in sys.modules


@pytest.fixture
def os_system_extension() -> Iterator[int]:
    """``os.system`` registered in the extension registry under a private-use code."""
    for code in range(240, 256):
        try:
            copyreg.add_extension("os", "system", code)
        except ValueError:
            continue
        break
    else:
        pytest.fail("no free private extension code")
    try:
        yield code
    finally:
        copyreg.remove_extension("os", "system", code)


@pytest.mark.parametrize(
    "ext",
    [
        lambda code: b"\x82" + code.to_bytes(1, "little"),
        lambda code: b"\x83" + code.to_bytes(2, "little"),
        lambda code: b"\x84" + code.to_bytes(4, "little"),
    ],
    ids=["EXT1", "EXT2", "EXT4"],
)
def test_extension_registry_opcodes_go_through_the_allow_list(
    marker: Path, os_system_extension: int, ext: Any
) -> None:
    data = PROTO2 + ext(os_system_extension) + long_str(touch_command(marker)) + b"\x85R."
    error = assert_rejected(data, marker)
    assert str(error) == "untrusted data may not load global 'os.system'"


def test_extension_cached_by_a_trusted_load_is_not_used(
    marker: Path, os_system_extension: int
) -> None:
    ext1 = b"\x82" + bytes([os_system_extension])
    # A trusted unpickle resolves the code and caches os.system for it
    # process-wide; the C unpickler consults that cache before find_class.
    assert pickle.loads(PROTO2 + ext1 + b".") is os.system
    data = PROTO2 + ext1 + long_str(touch_command(marker)) + b"\x85R."
    error = assert_rejected(data, marker)
    assert str(error) == "untrusted data may not load global 'os.system'"
    assert pickle.loads(PROTO2 + ext1 + b".") is os.system  # trusted loads still work


@pytest.mark.parametrize(
    "data",
    [
        b"Pabc\n.",  # PERSID
        PROTO2 + long_str("abc") + b"Q.",  # BINPERSID
        PROTO4 + short_str("abc") + b"Q" + stack_global("os", "system") + b".",
    ],
    ids=["PERSID", "BINPERSID", "BINPERSID-then-global"],
)
def test_persistent_ids_are_rejected(data: bytes) -> None:
    error = assert_rejected(data)
    assert str(error) == "untrusted data may not use persistent id 'abc'"


# -- restricted builtins -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (PROTO4 + stack_global("builtins", "bytearray") + long1(2**40) + b"\x85R.", "bytearray"),
        (PROTO2 + text_global("__builtin__", "bytes") + long1(2**40) + b"\x85R.", "bytes"),
        (
            PROTO4
            + stack_global("builtins", "bytearray")
            + short_str("x")
            + short_str("idna")
            + b"\x86R.",
            "bytearray",
        ),
        (
            PROTO2
            + text_global("_codecs", "encode")
            + long_str("x")
            + long_str("rot13")
            + b"\x86R.",
            "_codecs.encode",
        ),
        (
            PROTO2
            + text_global("_codecs", "encode")
            + long_str("x")
            + long_str("zlib")
            + b"\x86R.",
            "_codecs.encode",
        ),
        (PROTO2 + text_global("_codecs", "encode") + long_str("x") + b"\x85R.", "_codecs.encode"),
    ],
    ids=["bytearray(2**40)", "bytes(2**40)", "bytearray-codec", "rot13", "zlib", "one-argument"],
)
def test_restricted_builtins_accept_only_what_pickle_writes(data: bytes, shown: str) -> None:
    started = time.perf_counter()
    error = assert_rejected(data)
    assert time.perf_counter() - started < 1
    assert str(error).startswith("untrusted data may not call ")
    assert shown in str(error)


def test_newobj_cannot_call_a_restricted_builtin_as_a_class() -> None:
    data = PROTO4 + stack_global("builtins", "bytearray") + long1(2**40) + b"\x85\x81."
    assert_rejected(data)


def test_an_exception_from_a_constructor_is_chained() -> None:
    data = PROTO4 + stack_global("builtins", "complex") + short_str("not a number") + b"\x85R."
    error = assert_rejected(data)
    assert isinstance(error.__cause__, ValueError)


# -- memory and depth bombs --------------------------------------------------------

HUGE = 2**40


@pytest.mark.parametrize(
    "data",
    [
        PROTO5 + b"\x8e" + HUGE.to_bytes(8, "little") + b"abc",  # BINBYTES8
        PROTO5 + b"\x8d" + HUGE.to_bytes(8, "little") + b"abc",  # BINUNICODE8
        PROTO5 + b"\x96" + HUGE.to_bytes(8, "little") + b"abc",  # BYTEARRAY8
        PROTO5 + b"\x8e" + (2**63 - 1).to_bytes(8, "little") + b"abc",  # BINBYTES8, max
        PROTO2 + b"\x8b" + (2**31 - 1).to_bytes(4, "little") + b"abc",  # LONG4
        PROTO2 + b"B" + (2**32 - 1).to_bytes(4, "little") + b"abc",  # BINBYTES
        PROTO2 + b"X" + (2**32 - 1).to_bytes(4, "little") + b"abc",  # BINUNICODE
        PROTO4 + b"\x95" + HUGE.to_bytes(8, "little") + b"N.",  # FRAME
    ],
    ids=[
        "BINBYTES8",
        "BINUNICODE8",
        "BYTEARRAY8",
        "BINBYTES8-max",
        "LONG4",
        "BINBYTES",
        "BINUNICODE",
        "FRAME",
    ],
)
def test_a_crafted_length_fails_fast_without_using_memory(data: bytes) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    error = assert_rejected(data)
    assert time.perf_counter() - started < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024
    assert not isinstance(error, MemoryError)


DEPTH = 10**6


def test_a_million_nested_lists_decode() -> None:
    data = PROTO4 + b"]" * DEPTH + b"a" * (DEPTH - 1) + b"."
    node = restricted_loads(data, allowed=PLAIN)
    depth = 1
    while node:
        node = node[0]
        depth += 1
    assert depth == DEPTH


def test_a_million_marks_fail() -> None:
    assert_rejected(PROTO4 + b"(" * DEPTH + b".")


DEEP_TUPLE = b")" + b"\x85" * DEPTH  # ((((),),),) a million levels deep


@pytest.mark.parametrize(
    "data",
    [
        PROTO2 + b"}" + DEEP_TUPLE + b"Ns.",  # dict key, SETITEM
        PROTO4 + b"\x8f(" + DEEP_TUPLE + b"\x90.",  # set, ADDITEMS
        PROTO4 + b"(" + DEEP_TUPLE + b"\x91.",  # FROZENSET
        PROTO2 + text_global("__builtin__", "set") + b"](" + DEEP_TUPLE + b"e\x85R.",
    ],
    ids=["dict-key", "set", "frozenset", "set-call"],
)
def test_hashing_a_deeply_nested_tuple_does_not_crash(data: bytes) -> None:
    # Hashing a tuple recurses in C without a recursion check: on the
    # caller's stack this is a segmentation fault.
    result = restricted_loads(data, allowed=PLAIN)
    assert len(result) == 1


def test_comparing_deeply_nested_tuples_decodes_or_is_refused() -> None:
    # Two equal deep tuples as dict keys: their hashes match, so the dict
    # compares them, which recurses. Under the default recursion limit that is a
    # RecursionError, refused as such; where something raised the limit (it is
    # process-wide) it decodes. Either way the parent survives.
    deep = b")" + b"\x85" * 10_000
    value: object = None
    cause: BaseException | None = None
    try:
        value = restricted_loads(PROTO4 + b"}(" + deep + b"N" + deep + b"Nu.", allowed=PLAIN)
    except UntrustedDataError as error:
        cause = error.__cause__
    if cause is not None:
        assert isinstance(cause, RecursionError)
    else:
        assert isinstance(value, dict)
        assert len(value) == 1


# -- the cost of hashing ---------------------------------------------------------------


def shared_tuple(depth: int) -> tuple[Any, ...]:
    """``(t, t)`` where ``t = (u, u)`` ... ``depth`` levels: ``2**depth`` leaves, few objects."""
    node: tuple[Any, ...] = ()
    for _ in range(depth):
        node = (node, node)
    return node


SHARED = 24  # 2**24 leaves: a fraction of a second to hash, over the budget of a short pickle


@pytest.mark.parametrize(
    "wrap",
    [
        lambda key: {key},
        lambda key: {key: None},
        lambda key: frozenset({key}),
        lambda key: [1, {"k": [{(1, key)}]}],
        lambda key: {FrozenPoint(1, key)},
    ],
    ids=["set", "dict-key", "frozenset", "nested", "allowed-type-field"],
)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_key_whose_hash_visits_shared_items_many_times_is_refused(
    wrap: Any, protocol: int
) -> None:
    allowed = allowed_globals([FrozenPoint])
    # The pickler writes the shared inner tuple once and refers to it through the memo.
    cheap = pickle.dumps(wrap(shared_tuple(8)), protocol)
    assert restricted_loads(cheap, allowed=allowed) == wrap(shared_tuple(8))
    costly = pickle.dumps(wrap(shared_tuple(SHARED)), protocol)
    assert len(costly) < 1000
    error = assert_rejected(costly, allowed=allowed)
    assert "too costly to decode" in str(error)


def test_a_set_call_at_protocol_2_with_a_costly_key_is_refused() -> None:
    data = pickle.dumps({shared_tuple(SHARED)}, 2)
    assert text_global("__builtin__", "set") in data  # set([...]) at protocol 2
    assert "too costly" in str(assert_rejected(data))


def test_int_keys_that_all_hash_alike_are_refused_in_a_dict_and_a_set() -> None:
    modulus = 2**61 - 1  # k * modulus hashes to 0 for every k
    colliding = [k * modulus for k in range(1, 4001)]
    spread = list(range(1, 4001))
    assert restricted_loads(pickle.dumps(dict.fromkeys(spread), 5), allowed=PLAIN) == (
        dict.fromkeys(spread)
    )
    assert restricted_loads(pickle.dumps(set(spread), 5), allowed=PLAIN) == set(spread)
    for value in (dict.fromkeys(colliding), set(colliding), frozenset(colliding)):
        error = assert_rejected(pickle.dumps(value, 5))
        assert "keys that all hash to 0" in str(error)


def test_ordinary_hashed_data_of_some_size_decodes() -> None:
    value = {
        "rows": [{"id": i, "name": f"n{i}", "tags": {"a", "b", i % 7}} for i in range(20_000)],
        "index": {(i, str(i), (i, -i)): [i] for i in range(20_000)},
        "words": frozenset(f"w{i}" for i in range(20_000)),
        "many_small_collisions": {-1: 1, -2: 2},  # both hash to -2
    }
    # Beside the hashed data, one costly key: the whole pickle is refused.
    costly = pickle.dumps([value, {shared_tuple(SHARED)}], 5)
    assert_rejected(costly)
    assert restricted_loads(pickle.dumps(value, 5), allowed=PLAIN) == value


def test_a_text_put_with_an_index_that_hashes_like_others_is_refused() -> None:
    data = b"(lp" + str(2**61 - 1).encode() + b"\n}."  # PUT <2**61 - 1>; the dict forces checks
    error = assert_rejected(data)
    assert "memo index" in str(error)


# -- garbage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80",
        b"\x80\x05",
        b".",
        b"garbage",
        b"\x00" * 16,
        b"\xff" * 16,
        b"\x80\x06N.",  # unsupported protocol
        PROTO4 + short_str("a") + b"\x93.",  # STACK_GLOBAL with one string
        pickle.dumps([1, 2]) + b"\x00",  # bytes after the end
        pickle.dumps([1, 2], protocol=2) + b"N.",  # bytes after the end, unframed
        pickle.dumps(1) + pickle.dumps(2),
    ],
)
def test_garbage_raises_untrusted_data_error(data: bytes) -> None:
    error = assert_rejected(data)
    assert str(error).startswith("untrusted data ")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_truncation_of_a_pickle_raises_untrusted_data_error(protocol: int) -> None:
    data = pickle.dumps({"a": [1, (2.5, "x")], "b": {3, 4}, "c": bytearray(b"z")}, protocol)
    for end in range(len(data)):
        with pytest.raises(UntrustedDataError):
            restricted_loads(data[:end], allowed=PLAIN)


def test_data_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        restricted_loads(cast(Any, "text"), allowed=PLAIN)
