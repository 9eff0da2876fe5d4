"""The child's standard error: forwarded to ours as it comes, its end kept on ``WorkerDiedError``.

Real children, killed for real (a segfault, ``os.abort()``, SIGKILL, ``os._exit``)
under every start method: how the child's fd 2 is set up differs between them.
Forwarding is checked on the test process's own fd 2 (a file of the test's, or ``capfd``).
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

import pipe_rpc
from pipe_rpc._stderr import MESSAGE_LINES, TAIL_BYTES
from tests.services import StartMethod
from tests.stderr_services import FLOOD_LINE, Noisy, flood_text

METHODS: list[StartMethod] = ["fork", "forkserver", "spawn"]
#: Seconds to wait for something the test brought about (a line forwarded, a flood written).
SETTLE = 20.0


@pytest.fixture(params=METHODS)
def start_method(request: pytest.FixtureRequest) -> StartMethod:
    return cast(StartMethod, request.param)


@pytest.fixture
def noisy(start_method: StartMethod) -> Iterator[pipe_rpc.Server[Noisy]]:
    server = pipe_rpc.spawn(Noisy, start_method=start_method)
    yield server
    server.close()


def died(call: Callable[[], object]) -> pipe_rpc.WorkerDiedError:
    with pytest.raises(pipe_rpc.WorkerDiedError) as info:
        call()
    return info.value


def wait_until(condition: Callable[[], bool], what: str, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Forwarded:
    """What reached our fd 2, while fd 2 is a file of the test's own.

    Not ``capfd``: its ``readouterr()`` truncates the file after reading it, and a
    line the drain thread writes in between is lost. This file is only appended to,
    and read whole each time.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._saved = -1

    def __enter__(self) -> Forwarded:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def wait_for(self, *lines: str) -> list[str]:
        """Wait until every one of ``lines`` has come as a whole line; all lines so far."""
        text = ""

        def arrived() -> bool:
            nonlocal text
            text = self._path.read_text()
            return set(lines) <= set(text.splitlines())

        wait_until(arrived, f"lines {lines} on our stderr; so far {text[-2000:]!r}")
        return text.splitlines()


# -- crashes ----------------------------------------------------------------


def test_a_segfault_shows_its_python_stack_in_the_tail_and_the_message(
    noisy: pipe_rpc.Server[Noisy],
) -> None:
    error = died(noisy.proxy.segfault_in_service_method)
    assert error.exitcode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in error.stderr_tail
    assert "stderr_services.py" in error.stderr_tail
    assert "in segfault_in_service_method" in error.stderr_tail
    message = str(error)
    assert message.startswith(f"server process {noisy.pid} killed by SIGSEGV")
    assert "Fatal Python error: Segmentation fault" in message
    assert "in segfault_in_service_method" in message


def test_a_message_written_to_fd_2_before_a_crash_is_kept(noisy: pipe_rpc.Server[Noisy]) -> None:
    said = "fatal: assertion 'count > 0' failed in frobnicate()"
    error = died(lambda: noisy.proxy.c_message_then_segfault(f"{said}\n".encode()))
    assert error.exitcode == -signal.SIGSEGV
    tail = error.stderr_tail
    assert tail.startswith(f"{said}\nFatal Python error: Segmentation fault\n"), tail
    assert "in c_message_then_segfault" in tail
    assert said in str(error)


def test_abort_shows_its_python_stack(noisy: pipe_rpc.Server[Noisy]) -> None:
    error = died(noisy.proxy.abort_in_service_method)
    assert error.exitcode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in error.stderr_tail
    assert "in abort_in_service_method" in error.stderr_tail
    assert "killed by SIGABRT" in str(error)
    assert "in abort_in_service_method" in str(error)


def test_a_crash_report_longer_than_the_tail_keeps_its_start(
    noisy: pipe_rpc.Server[Noisy],
) -> None:
    """faulthandler prints the innermost frames first; under 90 more frames (and, under
    fork, the parent's frames) the report's start would scroll out of the last 4 KiB."""
    noisy.proxy.write("said before\n")
    error = died(lambda: noisy.proxy.segfault_deep_down(90))
    tail = error.stderr_tail
    assert len(tail.encode()) <= TAIL_BYTES
    assert tail.startswith("said before\nFatal Python error: Segmentation fault\n"), tail
    assert "in string_at\n" in tail
    assert "in _recurse_then_segfault\n" in tail
    assert "\n  ...\n" in tail
    assert tail.endswith("\n")
    assert "in string_at" in str(error)


def test_a_sigkilled_child_leaves_what_it_wrote(noisy: pipe_rpc.Server[Noisy]) -> None:
    pid = noisy.pid
    error = died(lambda: noisy.proxy.write_then_sigkill("last words before SIGKILL\n"))
    assert error.exitcode == -signal.SIGKILL
    assert error.stderr_tail == "last words before SIGKILL\n"
    assert str(error) == (
        f"server process {pid} killed by SIGKILL while running write_then_sigkill(); "
        "its standard error ended with:\n"
        "  last words before SIGKILL"
    )
    later = died(lambda: noisy.proxy.add(1, 2))  # a call to the dead child: the same tail
    assert later.stderr_tail == "last words before SIGKILL\n"
    assert str(later) == str(error)


def test_a_child_that_wrote_nothing_has_an_empty_tail_and_a_plain_message(
    noisy: pipe_rpc.Server[Noisy],
) -> None:
    pid = noisy.pid
    error = died(lambda: noisy.proxy.write_then_exit("", 0))
    assert error.exitcode == 0
    assert error.stderr_tail == ""
    assert str(error) == f"server process {pid} exited with code 0 while running write_then_exit()"
    assert error.methods == ("write_then_exit",)


def test_the_tail_is_the_last_4_kib_from_the_start_of_a_line() -> None:
    with pipe_rpc.spawn(Noisy, start_method="fork") as noisy:
        noisy.write(flood_text(0, 1000))
        error = died(lambda: noisy.write_then_exit("the end\n", 3))
    tail = error.stderr_tail
    assert len(tail.encode()) <= TAIL_BYTES
    assert len(tail.encode()) > TAIL_BYTES - len(FLOOD_LINE.format(0)) - len("the end\n")
    lines = tail.splitlines(keepends=True)
    assert lines[-1] == "the end\n"
    first = int(lines[0].split()[0])
    assert "".join(lines[:-1]) == flood_text(first, 1000 - first)
    shown = str(error).splitlines()
    assert len(shown) == 1 + MESSAGE_LINES
    assert shown[-1] == "  the end"


def test_a_tail_with_bytes_that_are_not_utf8_is_decoded_with_replacements() -> None:
    with pipe_rpc.spawn(Noisy, start_method="fork") as noisy:
        noisy.write_fd(b"caf\xc3\xa9 \xff\xfe\n")
        error = died(lambda: noisy.write_then_exit("", 3))
    assert error.stderr_tail == "caf\u00e9 \ufffd\ufffd\n"


def test_each_child_has_its_own_tail_across_restarts(start_method: StartMethod) -> None:
    with pipe_rpc.spawn(Noisy, start_method=start_method, restart="on-failure") as noisy:
        first = died(lambda: noisy.write_then_exit("first child\n", 3))
        second = died(lambda: noisy.write_then_exit("second child\n", 4))
    assert first.stderr_tail == "first child\n"
    assert second.stderr_tail == "second child\n"
    assert "first child" not in str(second)


def test_a_grandchild_holding_the_pipe_does_not_hold_back_the_tail() -> None:
    """The grandchild keeps the pipe's write end open for a minute: reading to the
    end of file would hang; the tail is complete all the same."""
    with pipe_rpc.spawn(Noisy, start_method="fork") as noisy:
        grandchild = noisy.start_grandchild_holding_stderr()
        try:
            error = died(lambda: noisy.write_then_exit("goodbye\n", 5))
        finally:
            os.kill(grandchild, signal.SIGKILL)
    assert error.exitcode == 5
    assert error.stderr_tail == "goodbye\n"


def test_a_worker_died_error_with_its_tail_pickles_to_an_equal_error() -> None:
    with pipe_rpc.spawn(Noisy, start_method="fork") as noisy:
        error = died(lambda: noisy.write_then_exit("some words\nand more\n", 3))
    assert error.stderr_tail == "some words\nand more\n"
    copy = pickle.loads(pickle.dumps(error))
    assert copy == error
    assert copy.stderr_tail == error.stderr_tail
    assert copy.exitcode == 3
    assert str(copy) == str(error)


# -- forwarding -------------------------------------------------------------


def test_forwarded_lines_stay_whole_and_in_order(start_method: StartMethod, tmp_path: Path) -> None:
    """Two children write; one writes a line in two pieces with the other's line in
    between. Each line reaches our fd 2 whole, each child's lines in order. The first
    child starts while our fd 2 is another file: what counts is fd 2 when it writes."""
    first = pipe_rpc.spawn(Noisy, start_method=start_method)
    forwarded = Forwarded(tmp_path / "fd2")
    with forwarded, first, pipe_rpc.spawn(Noisy, start_method=start_method) as b:
        a = first.proxy
        a.write_fd(b"A one, ")
        b.write_fd(b"B one\n")
        a.write_fd(b"still A one\n")
        a.write("A two\n")
        b.write("B two\n")
        lines = forwarded.wait_for("A one, still A one", "A two", "B one", "B two")
    assert lines.index("A one, still A one") < lines.index("A two")
    assert lines.index("B one") < lines.index("B two")


def test_fifty_megabytes_of_stderr_while_answering_calls(
    start_method: StartMethod, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A child floods its stderr from a thread of its own. It first writes 6 MB while
    we make no call (a pipe holds 64 KiB: if we stopped draining between calls it
    would block), then 51 MB while we keep calling. All of it reaches our fd 2 in
    order, and the tail of the SIGKILL that ends it is the flood's last whole lines."""
    quiet, busy = 100_000, 800_000
    with pipe_rpc.spawn(Noisy, start_method=start_method) as noisy:
        pid = noisy.pid()
        noisy.flood(quiet, str(tmp_path / "quiet"))
        wait_until((tmp_path / "quiet").exists, "the flood with no call in progress")
        noisy.flood(busy, str(tmp_path / "busy"))
        calls = 0
        while not (tmp_path / "busy").exists():
            assert noisy.add(calls, 1) == calls + 1
            calls += 1
        assert calls > 0
        os.kill(pid, signal.SIGKILL)
        error = died(lambda: noisy.add(1, 2))
    expected = flood_text(0, quiet) + flood_text(0, busy)
    tail = error.stderr_tail
    assert 0 < len(tail) <= TAIL_BYTES
    assert expected.endswith(tail)
    assert tail.startswith(FLOOD_LINE.format(busy - len(tail) // len(FLOOD_LINE.format(0))))
    err = capfd.readouterr().err
    complete = err == expected  # not `assert err == expected`: no diff of 57 MB
    assert complete, f"forwarded {len(err)} characters, expected {len(expected)}"


def test_many_children_share_one_draining_thread(tmp_path: Path) -> None:
    """Each child's stderr is its own (its own tail), and one thread drains them all."""

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    with Forwarded(tmp_path / "fd2") as forwarded:
        _many_children(forwarded, threads)


def _many_children(forwarded: Forwarded, threads: Callable[[], int]) -> None:
    servers = [pipe_rpc.spawn(Noisy, start_method="fork")]
    before = threads()
    servers += [pipe_rpc.spawn(Noisy, start_method="fork") for _ in range(7)]
    assert threads() <= before
    try:
        for number, server in enumerate(servers):
            server.proxy.write(f"child {number} here\n")
        forwarded.wait_for(*(f"child {number} here" for number in range(8)))
        errors = []
        for number, server in enumerate(servers):
            proxy = server.proxy
            errors.append(died(lambda: proxy.write_then_exit(f"bye {number}\n", 3)))  # noqa: B023
    finally:
        for server in servers:
            server.close()
    assert [error.stderr_tail for error in errors] == [
        f"child {n} here\nbye {n}\n" for n in range(8)
    ]
