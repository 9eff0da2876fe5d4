"""``untrusted=True``: a hostile child can send any bytes; the parent builds only plain data.

The hostile child (``tests.isolation_services.Hostile``) returns objects whose
pickles would run ``os.system`` or import modules, and writes hand-made
frames straight to its pipe. Every command it tries to get the parent to run
is ``touch <tmp>/ran-in.$PPID``: the shell's parent is whoever ran the gadget,
so a file named after the test process's pid means the parent was taken over.

Each rejected reply must raise ``ProtocolError``, run nothing, import nothing
(``sys.modules`` gains no key) and kill the child.
"""

from __future__ import annotations

import copyreg
import json
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pipe_rpc
from pipe_rpc._messages import Tag
from pipe_rpc._process import StartMethod
from tests.isolation_services import (
    Hostile,
    Point,
    fake_server,
    frame_bytes,
    plain_data,
)

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]
ONLY_IN_CHILD = "tests.untrusted_only_module"


def report(name: str, method: str, seconds: float) -> None:
    """One line per fault for grep: ``FAULT-TIME <name> <method> <seconds>``."""
    print(f"FAULT-TIME {name} {method} {seconds:.3f}")


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data[data.rindex(b")") + 2 :][:1] in (b"Z", b"X")


def touch_command(tmp_path: Path) -> str:
    """The command a gadget tries to run: leaves a file named after the pid that ran it."""
    return f"touch {tmp_path}/ran-in.$PPID"


def parent_ran_it(tmp_path: Path) -> bool:
    return (tmp_path / f"ran-in.{os.getpid()}").exists()


@pytest.fixture(autouse=True)
def _child_only_module_is_not_in_parent() -> Iterator[None]:
    assert ONLY_IN_CHILD not in sys.modules, "a test imported the child-only module"
    yield
    assert ONLY_IN_CHILD not in sys.modules, "the parent imported a module named by the child"


def _spawn(method: StartMethod | None = None, **kwargs: Any) -> pipe_rpc.Server[Hostile]:
    return pipe_rpc.spawn(
        Hostile,
        start_method=method,
        untrusted=True,
        restart="on-failure",
        timeout=30,
        **kwargs,
    )


@pytest.fixture(scope="module")
def hostile() -> Iterator[pipe_rpc.Server[Hostile]]:
    """An untrusted child that may send Point, and replies of at most 1 MiB."""
    server = _spawn(allowed_types=(Point,), max_reply_bytes=1 << 20)
    try:
        yield server
    finally:
        server.close()


def assert_rejected(
    server: pipe_rpc.Server[Hostile],
    call: Callable[[Hostile], object],
    tmp_path: Path,
    *,
    name: str,
    method: str = "forkserver",
    match: str | None = None,
) -> pipe_rpc.ProtocolError:
    """``call`` must raise ProtocolError, run nothing, import nothing and kill the child."""
    assert server.proxy.ping() == "pong"  # a live child, and the call path warmed up
    pid = server.pid
    assert pid is not None
    before = set(sys.modules)
    started = time.monotonic()
    with pytest.raises(pipe_rpc.ProtocolError, match=match) as info:
        call(server.proxy)
    elapsed = time.monotonic() - started
    new_modules = set(sys.modules) - before
    report(f"untrusted-{name}", method, elapsed)
    assert not new_modules, f"the parent imported {sorted(new_modules)}"
    assert not parent_ran_it(tmp_path), "the parent ran the child's command"
    assert wait_for(lambda: not server.is_alive(), 5.0), "the child was not killed"
    assert wait_for(lambda: _pid_gone(pid), 5.0), f"child {pid} is still running"
    assert server.proxy.ping() == "pong"  # restart="on-failure": a fresh child
    assert server.pid != pid
    return info.value


# -- what an honest untrusted child may send ------------------------------------


def test_plain_data_comes_through(hostile: pipe_rpc.Server[Hostile]) -> None:
    result = hostile.proxy.plain()
    assert result == plain_data()
    assert type(result["lists"][1][1][1]) is bytearray
    assert type(result["sets"][1]) is frozenset
    assert type(result["complex"]) is complex


def test_builtin_exceptions_are_rebuilt(hostile: pipe_rpc.Server[Hostile]) -> None:
    with pytest.raises(ValueError, match="bad") as value_error:
        hostile.proxy.raise_value_error("bad", 42, [1, 2])
    assert type(value_error.value) is ValueError
    assert value_error.value.args == ("bad", 42, [1, 2])
    assert isinstance(value_error.value.__cause__, pipe_rpc.RemoteTraceback)
    assert "raise_value_error" in str(value_error.value.__cause__)

    with pytest.raises(KeyError) as key_error:
        hostile.proxy.raise_key_error(("a", 1))
    assert key_error.value.args == (("a", 1),)

    with pytest.raises(OSError) as os_error:  # noqa: PT011 - errno and fields checked below
        hostile.proxy.raise_os_error(24, "Too many open files", "/tmp/x")
    assert type(os_error.value) is OSError
    assert os_error.value.errno == 24
    assert os_error.value.strerror == "Too many open files"
    assert os_error.value.filename == "/tmp/x"

    with pytest.raises(FileNotFoundError):  # OSError(ENOENT, ...) is built as its subclass
        hostile.proxy.raise_os_error(2, "No such file", "/missing")
    assert hostile.is_alive()


def test_custom_exception_is_remote_error(hostile: pipe_rpc.Server[Hostile]) -> None:
    pid = hostile.pid
    with pytest.raises(pipe_rpc.RemoteError, match="nope") as info:
        hostile.proxy.raise_custom("nope")
    assert info.value.remote_type == "tests.isolation_services.CustomError"
    assert "raise_custom" in info.value.remote_traceback
    assert hostile.pid == pid
    assert hostile.is_alive()


def test_exception_whose_pickle_runs_a_command_is_remote_error(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path
) -> None:
    before = set(sys.modules)
    with pytest.raises(pipe_rpc.RemoteError) as info:
        hostile.proxy.raise_system_gadget(touch_command(tmp_path))
    assert info.value.remote_type == "tests.isolation_services.SystemError_"
    assert not parent_ran_it(tmp_path)
    assert set(sys.modules) == before


def test_allowed_type_comes_through(hostile: pipe_rpc.Server[Hostile]) -> None:
    point = hostile.proxy.point(3, 4)
    assert type(point) is Point
    assert point == Point(3, 4)


def test_a_type_not_allowed_is_a_protocol_error(tmp_path: Path) -> None:
    server = _spawn()
    try:
        assert_rejected(
            server,
            lambda h: h.point_by_pickle(3, 4),
            tmp_path,
            name="type-not-allowed",
            match="Point",
        )
    finally:
        server.close()


# -- replies built by the child's own pickler ---------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_reply_that_would_run_os_system(method: StartMethod, tmp_path: Path) -> None:
    server = _spawn(method)
    try:
        command = touch_command(tmp_path)
        assert_rejected(
            server,
            lambda h: h.system_gadget(command),
            tmp_path,
            name="os-system-reply",
            method=method,
            match="system",
        )
        assert list(tmp_path.iterdir()) == []  # nobody ran it, not even the child
    finally:
        server.close()


def test_reply_that_would_import_a_module(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path
) -> None:
    assert_rejected(
        hostile,
        lambda h: h.import_gadget(ONLY_IN_CHILD),
        tmp_path,
        name="import-reply",
        match="__import__",
    )


def test_reply_that_would_getattr(hostile: pipe_rpc.Server[Hostile], tmp_path: Path) -> None:
    assert_rejected(
        hostile, lambda h: h.getattr_gadget(), tmp_path, name="getattr-reply", match="getattr"
    )


def test_reply_naming_a_module_the_parent_never_imported(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path
) -> None:
    assert_rejected(
        hostile,
        lambda h: h.unknown_module_object(),
        tmp_path,
        name="unknown-module-reply",
        match="untrusted_only_module",
    )


def test_oversize_reply(hostile: pipe_rpc.Server[Hostile], tmp_path: Path) -> None:
    assert hostile.proxy.make_bytes(1000) == bytes(1000)
    assert_rejected(
        hostile, lambda h: h.make_bytes(2 << 20), tmp_path, name="oversize-reply", match="bound"
    )


# -- hand-written frames ---------------------------------------------------------------


def _hand_written(tmp_path: Path) -> dict[str, bytes | tuple[int, bytes]]:
    """Replies no pickler writes: ``bytes`` go on the pipe as is, ``(tag, payload)`` as a frame."""
    cmd = touch_command(tmp_path).encode()
    only = ONLY_IN_CHILD.encode()
    ret = int(Tag.RETURN)
    huge = struct.pack("<Q", 1 << 40)
    return {
        "negative-length": b"\xff\xff\xff\xfe" + b"garbage",
        "short-frame": b"\x00\x00\x00\x03abc",
        "unknown-tag": (99, b"x"),
        "second-hello": (int(Tag.HELLO), b"pipe_rpc" + struct.pack("!HI", 1, 1)),
        "call-to-client": (int(Tag.CALL), pickle.dumps(("x", (), {}))),
        "garbage-pickle": (ret, b"garbage"),
        "global-os-system": (ret, b"cos\nsystem\n(V" + cmd + b"\ntR."),
        "inst-os-system": (ret, b"(V" + cmd + b"\nios\nsystem\n."),
        "stack-global-import": (
            ret,
            b"\x80\x04\x8c\x08builtins\x8c\x0a__import__\x93"
            + b"\x8c"
            + bytes([len(only)])
            + only
            + b"\x85R.",
        ),
        "newobj-unknown-module": (ret, b"\x80\x02c" + only + b"\nThing\n)\x81."),
        "builtins-eval": (ret, b"cbuiltins\neval\n(V__import__('os')\ntR."),
        "copyreg-reconstructor": (ret, b"ccopyreg\n_reconstructor\n(cos\nsystem\nNNtR."),
        "persistent-id": (ret, b"\x80\x05\x8c\x01x\x94Q."),
        "binbytes8-1TiB": (ret, b"\x80\x05\x8e" + huge + b"x."),
        "bytearray8-1TiB": (ret, b"\x80\x05\x96" + huge + b"x."),
        "bytes-constructor": (ret, b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R."),
        "bytearray-codec": (
            ret,
            b"\x80\x02c__builtin__\nbytearray\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
        ),
        "trailing-bytes": (ret, pickle.dumps(1) + b"junk"),
        "unregistered-ext": (ret, b"\x80\x02\x82\x05."),
        "malformed-exception": (int(Tag.RAISE), pickle.dumps(42)),
    }


_CASES = sorted(_hand_written(Path("/x")))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", _CASES)
def test_hand_written_reply_is_refused(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path, case: str
) -> None:
    reply = _hand_written(tmp_path)[case]
    if isinstance(reply, bytes):
        raw = reply
        assert_rejected(hostile, lambda h: h.send_raw(raw), tmp_path, name=case)
    else:
        tag, payload = reply
        assert_rejected(hostile, lambda h: h.send_reply(tag, payload), tmp_path, name=case)


def test_hand_written_plain_reply_is_taken(hostile: pipe_rpc.Server[Hostile]) -> None:
    """The control for the cases above: a hand-written frame of plain data is this call's reply."""
    pid = hostile.pid
    payload = b"\x80\x02]q\x00(K\x01X\x01\x00\x00\x00ae."  # [1, "a"] at protocol 2
    assert hostile.proxy.send_reply(int(Tag.RETURN), payload) == [1, "a"]
    assert hostile.pid == pid
    assert hostile.is_alive()


def test_poisoned_extension_cache_is_not_used(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path
) -> None:
    """A trusted unpickle cached os.system for an extension code: untrusted data may not use it."""
    code = 0x7FFFF0
    copyreg.add_extension("os", "system", code)
    try:
        assert pickle.loads(b"\x80\x02\x84" + struct.pack("<i", code) + b".") is os.system
        payload = b"\x80\x02\x84" + struct.pack("<i", code)
        payload += b"V" + touch_command(tmp_path).encode() + b"\n\x85R."
        assert_rejected(
            hostile,
            lambda h: h.send_reply(int(Tag.RETURN), payload),
            tmp_path,
            name="poisoned-ext-cache",
            match="os.system",
        )
    finally:
        copyreg.remove_extension("os", "system", code)
        copyreg.clear_extension_cache()


def _exception_frame(blob: bytes | None, form: int = 0, name: str = "x.Err") -> bytes:
    return pickle.dumps((name, "message", "traceback text", form, blob))


def test_hand_written_exception_payloads_become_remote_error(
    hostile: pipe_rpc.Server[Hostile], tmp_path: Path
) -> None:
    gadget = b"cos\nsystem\n(V" + touch_command(tmp_path).encode() + b"\ntR."
    parts = pickle.dumps((ValueError, (1,), {}))
    cases = {
        "os-system-blob": _exception_frame(gadget),
        "parts-form": _exception_frame(parts, form=1),
        "keyboard-interrupt": _exception_frame(pickle.dumps(KeyboardInterrupt()), name="ki"),
        "system-exit": _exception_frame(pickle.dumps(SystemExit(3)), name="se"),
        "no-blob": _exception_frame(None, form=2),
    }
    before = set(sys.modules)
    pid = hostile.proxy.pid()
    for case, payload in cases.items():
        with pytest.raises(pipe_rpc.RemoteError) as info:
            hostile.proxy.send_reply(int(Tag.RAISE), payload)
        assert info.value.remote_type in ("x.Err", "ki", "se"), case
        assert isinstance(info.value.__cause__, pipe_rpc.RemoteTraceback)
    assert not parent_ran_it(tmp_path)
    assert set(sys.modules) == before
    assert hostile.pid == pid
    assert hostile.is_alive()


@pytest.mark.parametrize("inner", ["KeyboardInterrupt", "SystemExit"])
def test_exception_group_cannot_smuggle_keyboard_interrupt_or_system_exit(
    hostile: pipe_rpc.Server[Hostile], inner: str
) -> None:
    """A KeyboardInterrupt or SystemExit must never reach the caller, even inside a group.

    ``BaseExceptionGroup`` is a builtin exception type, but re-raising it whole
    hands the caller a ``BaseException`` that ``except Exception`` does not
    catch, which is what the SystemExit / KeyboardInterrupt rule is there to stop.
    """
    wrapped: BaseException = KeyboardInterrupt() if inner == "KeyboardInterrupt" else SystemExit(3)
    error = BaseExceptionGroup("group", [wrapped])
    payload = _exception_frame(pickle.dumps(error), name="builtins.BaseExceptionGroup")
    caught: BaseException | None = None
    try:
        hostile.proxy.send_reply(int(Tag.RAISE), payload)
    except BaseException as exc:
        caught = exc
    assert isinstance(caught, pipe_rpc.PipeRPCError), (
        f"the caller got {caught!r}, which `except Exception` does not catch"
    )


def test_deeply_nested_plain_data_does_not_crash_the_parent(
    hostile: pipe_rpc.Server[Hostile],
) -> None:
    """A frozenset holding a tuple nested a million deep: hashing it must not overflow the stack."""
    depth = 1_000_000
    payload = b"\x80\x04cbuiltins\nfrozenset\n)" + b"\x85" * depth + b"\x85\x85R."
    assert len(payload) < 1 << 20
    started = time.monotonic()
    result = hostile.proxy.send_reply(int(Tag.RETURN), payload)
    report("untrusted-nesting-1M", "forkserver", time.monotonic() - started)
    assert type(result) is frozenset
    assert len(result) == 1
    del result
    assert hostile.proxy.ping() == "pong"


# -- a hand-written peer (Client, not spawn) -----------------------------------------------


def _client_with_fake_server(
    replies: list[bytes | tuple[int, bytes]],
) -> tuple[pipe_rpc.Client[Hostile], multiprocessing.process.BaseProcess]:
    ctx = multiprocessing.get_context("forkserver")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=fake_server, args=(child, replies))
    process.start()
    child.close()
    client: pipe_rpc.Client[Hostile] = pipe_rpc.Client(
        parent, process=process, untrusted=True, timeout=30, max_reply_bytes=1 << 16
    )
    return client, process


def _stop(client: pipe_rpc.Client[Hostile], process: multiprocessing.process.BaseProcess) -> None:
    client.close()
    process.join(5)
    if process.exitcode is None:
        process.kill()
        process.join(5)


def test_fake_server_control_plain_reply_works() -> None:
    client, process = _client_with_fake_server([(int(Tag.RETURN), pickle.dumps({"ok": [1, 2]}))])
    try:
        assert client.call("anything") == {"ok": [1, 2]}
    finally:
        _stop(client, process)


@pytest.mark.parametrize(
    "replies",
    [
        pytest.param([b"\x00\x00\x00\x07garbage"], id="garbage-instead-of-hello"),
        pytest.param([b"\x00\x00\x00\x0b" + bytes(11)], id="zeros-instead-of-hello"),
        pytest.param([b"\x00\x10\x00\x00"], id="oversize-instead-of-hello"),
        pytest.param([(int(Tag.RETURN), b"garbage")], id="garbage-reply"),
        pytest.param([(int(Tag.RETURN), b"cos\nsystem\n(VCMD\ntR.")], id="os-system-reply"),
    ],
)
def test_fake_server_hostile_replies_are_protocol_errors(
    replies: list[bytes | tuple[int, bytes]], tmp_path: Path
) -> None:
    command = touch_command(tmp_path).encode()
    replies = [
        r if isinstance(r, bytes) else (r[0], r[1].replace(b"CMD", command)) for r in replies
    ]
    before = set(sys.modules)
    client, process = _client_with_fake_server(replies)
    try:
        with pytest.raises(pipe_rpc.ProtocolError):
            client.call("anything")
        assert client.broken is not None
        with pytest.raises(pipe_rpc.ProtocolError):
            client.call("again")  # the connection stays dead
    finally:
        _stop(client, process)
    assert not parent_ran_it(tmp_path)
    assert set(sys.modules) == before


def test_frame_bytes_matches_connection_framing() -> None:
    """The test helper frames exactly as ``Connection.send_bytes`` does."""
    a, b = multiprocessing.Pipe()
    try:
        a.send_bytes(struct.pack("!BQ", 3, 7) + b"xyz")
        expected = b.recv_bytes()
        framed = frame_bytes(3, 7, b"xyz")
        assert struct.unpack("!i", framed[:4])[0] == len(framed) - 4
        assert framed[4:] == expected
    finally:
        a.close()
        b.close()


# -- small replies that would take hours to hash ------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["shared-tuples", "colliding-ints"])
def test_a_reply_costly_to_hash_is_refused_and_the_parent_keeps_running(shape: str) -> None:
    """The parent runs in a process of its own: a parent that hashed such a reply would hold
    the GIL in C for hours, out of reach of any timeout inside it."""
    script = Path(__file__).resolve().parent / "hash_flood_parent.py"
    done = subprocess.run(
        [sys.executable, str(script), shape],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert outcome["error"] == "ProtocolError", outcome
    assert "too costly to decode" in outcome["message"]
    assert outcome["ticker_alive"], "a thread of the parent stopped running"
    assert not outcome["child_alive"], "the child that sent it was not killed"
