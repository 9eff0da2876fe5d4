"""Each example runs as ``python examples/NAME.py`` from the repo root and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Each example's expected output lines, as regular expressions matched in order.
#: Examples with a test of their own elsewhere (sandbox: tests/test_isolation.py; ray_cluster
#: needs Ray, which this suite does not install: tests_ray/test_ray.py runs it).
TESTED_ELSEWHERE = {"sandbox", "ray_cluster"}

EXPECTED: dict[str, list[str]] = {
    "async_client": [
        r"acall: 3",
        r"100 calls in flight at once, sum: 9900",
        r"async def method: KEY",
        r"cancelled; the proxy goes on: 4",
        r"submit: 42",
    ],
    "quickstart": [
        r"add\(1, 2\) = 3",
        r"caught ZeroDivisionError: division by zero",
        r"remote traceback mentions divide\(\): True",
        r"timed out after \d+\.\d s: CallTimeoutError",
        r"add\(2, 3\) = 5",
    ],
    "conversation": [
        re.escape("[42, None, 'hello']"),
        re.escape("[None, 'two', 1]"),
        r"answered by another process: True",
        r"child exit code: 0",
    ],
    "isolate_crash": [
        r"first child pid: \d+",
        r"call failed: .*SIGSEGV.*",
        r"exitcode: -11",
        r"the stack names crash\(\): True",
        r"second child pid: \d+",
        r"fresh child: True",
        r"parent \d+ is still running",
    ],
    "pool_parse": [
        r"parsed 37 of 40 lines, \d+ words",
        re.escape("crashed on lines: 7 (-11), 19 (-11), 31 (-11)"),
        r"children now: 2, replaced: True",
        r"parent \d+ is still running",
    ],
    "stream_rows": [
        r"read 10000 rows, sum of squares 333283335000",
        re.escape("first items of an endless stream: [0, 1, 2, 3, 4]"),
        r"the child's generator was closed: True",
        re.escape("astream: ['0', '1', '4', '9']"),
        re.escape("async generator method: [0, 1, 2]"),
    ],
    "typed_protocol": [
        re.escape("get('a') = b'1'"),
        re.escape("get('missing') = None"),
        re.escape("keys() = ['a', 'b']"),
        r"child exit code: 0",
    ],
}


def test_every_example_is_tested() -> None:
    assert {path.stem for path in EXAMPLES.glob("*.py")} == set(EXPECTED) | TESTED_ELSEWHERE


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(Path("examples") / f"{name}.py")],
        cwd=ROOT,
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )
    report = f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    lines = result.stdout.splitlines()
    assert len(lines) == len(EXPECTED[name]), report
    for line, pattern in zip(lines, EXPECTED[name], strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}\n{report}"
    assert "Traceback" not in result.stderr, report
    if name == "isolate_crash":  # the crash really took a process, not the parent
        pids = re.findall(r"(?:child pid: |parent )(\d+)", result.stdout)
        assert len(set(pids)) == 3, report
