"""Proxies across os.fork() (contract section 3c): a proxy, client or server belongs
to the process that made it."""

from __future__ import annotations

import os
import sys
import time
import warnings

import pytest

import pipe_rpc
from tests.calc_service import CalcService
from tests.services import StartMethod


def _in_forked_child(server: pipe_rpc.Server[CalcService], seconds: float) -> int:
    """In a child made by os.fork(): every call refuses at once, for ``seconds``.
    Returns the exit status to use."""
    calc = server.proxy
    deadline = time.monotonic() + seconds
    refused = 0
    while time.monotonic() < deadline:
        try:
            calc.echo(("child", refused))
        except pipe_rpc.PipeRPCError as exc:
            if "belongs to the process that made it" not in str(exc):
                return 3
            refused += 1
            continue
        return 4  # a call went through: it must not
    return 0 if refused > 100 else 5


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_proxy_used_after_os_fork_refuses_and_its_owner_goes_on(method: StartMethod) -> None:
    server = pipe_rpc.spawn(CalcService, start_method=method, timeout=5.0)
    with server as calc:
        assert calc.add(1, 2) == 3
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():  # 3.12+: forking with threads (ours are bare)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the forked child: no pytest machinery from here on
            os.close(read_end)
            status = _in_forked_child(server, 2.0)
            os.write(write_end, str(status).encode())
            sys.stdout.flush()
            os._exit(status)
        os.close(write_end)
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:  # the owner calls all along
            n += 1
            assert calc.echo(("parent", n)) == ("parent", n)
        _, status = os.waitpid(pid, 0)
        said = os.read(read_end, 16)
        os.close(read_end)
        assert os.waitstatus_to_exitcode(status) == 0, said
        assert calc.add(2, 2) == 4


def test_a_forked_child_that_exits_normally_prints_nothing(tmp_path: object) -> None:
    """sys.exit in a child of os.fork() runs the exit hooks: none of ours may complain
    (multiprocessing would try to join our server, which is not its child)."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import os, sys, warnings
        import pipe_rpc
        from tests.calc_service import CalcService

        if __name__ == "__main__":
            server = pipe_rpc.spawn(CalcService, start_method="fork")
            assert server.proxy.add(1, 2) == 3
            with warnings.catch_warnings():  # 3.12+: forking with threads (ours are bare)
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert server.proxy.add(1, 2) == 3
            server.close()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_servers_still_open_at_exit_are_stopped_together() -> None:
    """Five servers busy in a call at exit: each is asked, then signalled, at the same
    time as the others, so the exit takes about one grace period, not five."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import threading, time
        import pipe_rpc
        from tests.calc_service import CalcService

        if __name__ == "__main__":
            servers = [pipe_rpc.spawn(CalcService, start_method="forkserver") for _ in range(5)]
            for server in servers:  # each busy for a long time: a graceful stop cannot land
                threading.Thread(
                    target=server.proxy.sleep_then_return, args=(60, 0), daemon=True
                ).start()
            for server in servers:
                while server._handle.child.client._core.in_flight == 0:
                    time.sleep(0.01)
            print(time.monotonic(), flush=True)
        """
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stderr
    exiting = float(result.stdout.split()[-1])
    # One by one this took five graces (over 6 s); together it takes about one. The
    # bound is wide: it only tells the two apart on a loaded machine.
    assert time.monotonic() - exiting < 4.0, time.monotonic() - started
