"""The parent's main script, as ``spawn`` and ``forkserver`` children would run it again.

Before a child of those start methods unpickles anything, ``multiprocessing``
prepares it (``spawn.get_preparation_data`` in the parent, ``spawn.prepare``
in the child): if the parent's ``__main__`` has a ``__file__``, the child runs
that file again as ``__mp_main__`` (``runpy.run_path``), so that what the
parent's script defines can be found by name. A script read from standard
input (``python - < app.py``) has ``__file__ == "<stdin>"``, which names no
file: every child fails with ``FileNotFoundError`` before it even starts.
So does a script deleted since it started.

pipe_rpc needs no such re-run: the factory, and with it whatever the script
defines, travels by value with cloudpickle. While a child starts,
:func:`main_for_children` hides a ``__file__`` that names no file, and
multiprocessing then leaves the child's ``__main__`` alone, as it does for a
REPL or ``python -c``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["main_for_children"]

#: Threads that start children at once must not restore each other's ``__file__``.
_LOCK = threading.Lock()


@contextlib.contextmanager
def main_for_children(start_method: str) -> Iterator[None]:
    """Around ``Process.start()``: children of ``start_method`` do not run a main script
    that is not a file.

    Nothing changes for ``fork`` (the child is a copy, nothing is run again), for a
    main module run by name (``python -m``), or for a script file that exists.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if (
        start_method == "fork"
        or main is None
        or not isinstance(path, str)
        or getattr(getattr(main, "__spec__", None), "name", None) is not None  # -m: by name
        or os.path.isfile(_as_multiprocessing_finds(path))
    ):
        yield
        return
    with _LOCK:
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


def _as_multiprocessing_finds(path: str) -> str:
    """``path`` joined to the directory the program started in, as the child looks it up."""
    from multiprocessing import process

    original: str | None = getattr(process, "ORIGINAL_DIR", None)  # not in the stubs
    if not os.path.isabs(path) and original is not None:
        return os.path.join(original, path)
    return path


def unguarded_main_call() -> tuple[str, int] | None:
    """Where the main script's top level starts a child outside an
    ``if __name__ == "__main__":`` block, as ``(file, line)``; ``None`` if it does not.

    Under ``spawn`` and ``forkserver`` each child imports the main script again, so
    such a script makes its child start a child of its own while it bootstraps,
    which multiprocessing refuses: the child exits before it says hello. Only
    looked at once a child has failed to start.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            break
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename
    line = frame.f_lineno
    try:
        import ast

        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            last = node.body[-1].end_lineno or node.body[-1].lineno
            if node.body[0].lineno <= line <= last:
                return None
    return path, line


def _is_main_test(test: object) -> bool:
    import ast

    if not isinstance(test, ast.Compare) or len(test.ops) != 1:
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, *test.comparators]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


def missing_guard_message(where: tuple[str, int], died: str) -> str:
    """A ``StartupError`` message for a script with no main guard."""
    path, line = where
    return (
        f"the main script starts a child when it is imported ({path}, line {line}): "
        "put that code under the main guard\n"
        '    if __name__ == "__main__":\n'
        "        ...  # the code that starts children\n"
        "Under the spawn and forkserver start methods every child imports the main "
        f"script again, and would start a child of its own ({died})."
    )
