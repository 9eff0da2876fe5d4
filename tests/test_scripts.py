"""Services defined in the main script, run as a file and read from standard input.

Each test runs ``tests/script_app.py`` (copied to a temporary directory) in a
process of its own, since the service must live in that process's ``__main__``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = ["fork", "forkserver", "spawn"]
APP = Path(__file__).resolve().parent / "script_app.py"
RAISE_LINE = 'raise ValueError("boom from the script")'


def _raise_lineno() -> int:
    lines = APP.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == RAISE_LINE)


def _run(tmp_path: Path, args: list[str], *, stdin: bool) -> str:
    script = tmp_path / "app.py"
    shutil.copy(APP, script)
    command = [sys.executable, "-", *args] if stdin else [sys.executable, str(script), *args]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        input=script.read_text() if stdin else None,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"OK {args[0]}"
    return done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_remote_traceback_of_a_script_names_its_file_line_and_source(
    method: str, tmp_path: Path
) -> None:
    out = _run(tmp_path, [method, "spawn"], stdin=False)
    assert f'File "{tmp_path / "app.py"}", line {_raise_lineno()}, in fail\n' in out
    assert f"    {RAISE_LINE}\n" in out
    assert "<dynamic-code>" not in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_a_script_read_from_stdin_starts_its_children_and_names_its_lines(
    method: str, tmp_path: Path
) -> None:
    """Standard input keeps no source, here as in the script's own tracebacks: the
    file is ``<stdin>`` and the line its number alone."""
    out = _run(tmp_path, [method, "by-hand"], stdin=True)
    assert f'File "<stdin>", line {_raise_lineno()}, in fail\n' in out
    assert "<dynamic-code>" not in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_spawn_from_a_script_read_from_stdin(method: str, tmp_path: Path) -> None:
    out = _run(tmp_path, [method, "spawn"], stdin=True)
    assert f'File "<stdin>", line {_raise_lineno()}, in fail\n' in out
