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
