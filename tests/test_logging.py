"""Logger ``"pipe_rpc"``: INFO for start, restart and close, WARNING for a death and a
timeout kill, nothing for a call.

The records are made in the parent, the same under every start method: ``fork``
(the fastest) stands for all, except where the child's own output is the subject.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pipe_rpc
from tests.stderr_services import Noisy

ROOT = Path(__file__).resolve().parent.parent


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The ``pipe_rpc`` records so far, as (level, message); then forget them."""
    found = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pipe_rpc"]
    caplog.clear()
    return found


def died(call: Callable[[], object]) -> pipe_rpc.WorkerDiedError:
    with pytest.raises(pipe_rpc.WorkerDiedError) as info:
        call()
    return info.value


def test_start_and_close_are_logged_at_info_and_calls_are_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pipe_rpc")
    server = pipe_rpc.spawn(Noisy, start_method="fork")
    pid = server.pid
    assert records(caplog) == [(logging.INFO, f"server process {pid} started (start method fork)")]
    for n in range(200):
        assert server.proxy.add(n, 1) == n + 1
    assert records(caplog) == []
    server.close()
    server.close()  # closed once, logged once
    assert records(caplog) == [
        (logging.INFO, f"server process {pid} closed: exited with code 0 (start method fork)")
    ]


def test_a_restart_is_logged_at_info_with_both_pids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipe_rpc")
    server = pipe_rpc.spawn(Noisy, start_method="fork")
    try:
        old = server.pid
        assert [level for level, _ in records(caplog)] == [logging.INFO]
        server.restart()
        new = server.pid
        assert new != old
        assert records(caplog) == [
            (logging.INFO, f"server process {old} restarted as {new} (start method fork)")
        ]
    finally:
        server.close()


def test_a_death_is_logged_once_at_warning_with_its_reason_code_and_last_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pipe_rpc")
    server = pipe_rpc.spawn(Noisy, start_method="fork")
    pid = server.pid
    records(caplog)
    died(lambda: server.proxy.write_then_exit("first\ngoodbye from the child\n", 3))
    died(lambda: server.proxy.add(1, 2))  # seen dead again: not news
    assert records(caplog) == [
        (
            logging.WARNING,
            f"server process {pid} died: exit 3 (exit code 3); "
            "last line on its stderr: 'goodbye from the child'",
        )
    ]
    server.close()
    assert [level for level, _ in records(caplog)] == [logging.INFO]


def test_a_death_seen_first_by_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipe_rpc")
    server = pipe_rpc.spawn(Noisy, start_method="fork")
    pid = server.pid
    server.proxy.write("about to be killed\n")
    records(caplog)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.is_alive():  # dead before close() begins
        assert time.monotonic() < deadline, "SIGKILL did not kill"
        time.sleep(0.005)
    server.close()
    found = records(caplog)
    assert found[0] == (
        logging.WARNING,
        f"server process {pid} died: SIGKILL (exit code -9); "
        "last line on its stderr: 'about to be killed'",
    )
    assert found[1:] == [
        (logging.INFO, f"server process {pid} closed: killed by SIGKILL (start method fork)")
    ]


def test_a_crash_and_the_restart_after_it_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipe_rpc")
    with pipe_rpc.spawn(Noisy, start_method="fork", restart="on-failure") as proxy:
        old = proxy.pid()
        records(caplog)
        died(proxy.segfault_in_service_method)
        new = proxy.pid()
        found = records(caplog)
    assert [level for level, _ in found] == [logging.WARNING, logging.INFO]
    assert found[0][1].startswith(f"server process {old} died: SIGSEGV (exit code -11); ")
    assert found[1][1] == f"server process {old} restarted as {new} (start method fork)"


def test_a_timeout_kill_is_logged_at_warning_and_not_as_a_death(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pipe_rpc")
    server = pipe_rpc.spawn(Noisy, start_method="fork", timeout=0.2, on_timeout="kill")
    pid = server.pid
    records(caplog)
    with pytest.raises(pipe_rpc.CallTimeoutError):
        server.proxy.block(60)
    died(lambda: server.proxy.add(1, 2))
    server.close()
    assert records(caplog) == [
        (
            logging.WARNING,
            f"server process {pid}: block() timed out; killing it (on_timeout='kill')",
        ),
        (logging.INFO, f"server process {pid} closed: killed by SIGTERM (start method fork)"),
    ]


def test_records_reach_the_programs_handlers_and_never_logging_last_resort() -> None:
    """Before the program sets up logging, a death prints nothing of ours (logging's
    last-resort handler would print warnings to stderr); after, its handler gets it.
    The program's stderr holds the dying children's lines and nothing else."""
    code = (
        "import logging, sys\n"
        "import pipe_rpc\n"
        "from tests.stderr_services import Noisy\n"
        "for n in (1, 2):\n"
        "    server = pipe_rpc.spawn(Noisy, start_method='fork')\n"
        "    try:\n"
        "        server.proxy.write_then_exit(f'child {n} says goodbye\\n', 3)\n"
        "    except pipe_rpc.WorkerDiedError:\n"
        "        pass\n"
        "    server.close()\n"
        "    logging.basicConfig(stream=sys.stdout, format='%(levelname)s %(message)s')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "child 1 says goodbye\nchild 2 says goodbye\n"
    assert result.stdout.startswith("WARNING server process "), result.stdout
    assert result.stdout.endswith(
        " died: exit 3 (exit code 3); last line on its stderr: 'child 2 says goodbye'\n"
    )
    assert result.stdout.count("\n") == 1, result.stdout
