"""The package as a user installs it: importable, and seen by mypy with its real types.

Each test makes a fresh virtual environment, installs the package into it (the
README's editable install, or a wheel built from an sdist), then type-checks a
user's file in a temporary folder outside the repository. mypy runs from the
test's own environment with ``--python-executable`` pointing at the fresh one,
so it sees exactly what that environment's ``site-packages`` shows: an
editable install that only an import hook can find would be
``import-not-found`` here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = '''\
"""A user's script, in a folder of its own."""

from typing import reveal_type

import pipe_rpc


class Calculator:
    def add(self, a: int, b: int) -> int:
        return a + b


def main() -> None:
    server = pipe_rpc.spawn(Calculator)
    reveal_type(server)
    reveal_type(server.proxy.add(1, 2))
    with server as calc:
        reveal_type(calc)
        print(f"add(1, 2) = {calc.add(1, 2)}")


if __name__ == "__main__":
    main()
'''

# What mypy must reveal on each reveal_type line of USER_CODE, in order.
REVEALED = [
    r"pipe_rpc\._process\.Server\[user\.Calculator\]",
    r"(builtins\.)?int",
    r"user\.Calculator",
]


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    """Run a command outside the repository, with no path of the repository's inherited."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MYPYPATH"}}
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"{args} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def _fresh_venv(tmp_path: Path) -> Path:
    """A new virtual environment with pip and nothing else; returns its python."""
    _run([sys.executable, "-m", "venv", tmp_path / "venv"], cwd=tmp_path)
    return tmp_path / "venv" / "bin" / "python"


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "user.py").write_text(USER_CODE)
    # A config of the user's own, so no configuration of the repository applies.
    (folder / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    return folder


def _check_user_code(python: Path, folder: Path) -> None:
    """mypy --strict on the user's file sees the package's types; the file runs."""
    stdout = _run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-executable",
            python,
            "--cache-dir",
            folder / ".mypy_cache",
            "--no-color-output",
            "--no-pretty",
            "user.py",
        ],
        cwd=folder,
    )
    revealed = re.findall(r'^user\.py:\d+: note: Revealed type is "(.*)"$', stdout, re.MULTILINE)
    assert len(revealed) == len(REVEALED), stdout
    for got, want in zip(revealed, REVEALED, strict=True):
        assert re.fullmatch(want, got), f"revealed {got!r}, want {want!r}\n{stdout}"
    assert "error:" not in stdout, stdout
    assert _run([python, "user.py"], cwd=folder) == "add(1, 2) = 3\n"


def _imported_from(python: Path, folder: Path) -> Path:
    return Path(
        _run([python, "-c", "import pipe_rpc; print(pipe_rpc.__file__)"], cwd=folder).strip()
    )


def test_editable_install_is_seen_by_mypy(tmp_path: Path) -> None:
    """The README's ``pip install -e .``: mypy in another folder finds the package."""
    python = _fresh_venv(tmp_path)
    _run([python, "-m", "pip", "install", "-q", "-e", ROOT], cwd=tmp_path)
    folder = _user_folder(tmp_path)
    assert _imported_from(python, folder) == ROOT / "pipe_rpc" / "__init__.py"
    _check_user_code(python, folder)


def test_wheel_ships_py_typed_and_is_seen_by_mypy(tmp_path: Path) -> None:
    """``python -m build`` (an sdist, and a wheel built from it) installs into a clean venv."""
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=tmp_path)
    (wheel,) = dist.glob("pipe_rpc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"pipe_rpc/__init__.py", "pipe_rpc/py.typed"} <= names, sorted(names)
    assert all(name.startswith(("pipe_rpc/", "pipe_rpc-")) for name in names), sorted(names)

    python = _fresh_venv(tmp_path)
    _run([python, "-m", "pip", "install", "-q", wheel], cwd=tmp_path)
    folder = _user_folder(tmp_path)
    installed = _imported_from(python, folder)
    assert ROOT not in installed.parents, installed
    assert (installed.parent / "py.typed").is_file()
    _check_user_code(python, folder)
