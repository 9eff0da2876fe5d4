"""Pickle a reply for a parent that does not trust us: every global by name, and allowed.

A child started with ``untrusted=True`` has its replies decoded by the
parent's restricted unpickler (``_untrusted``), which resolves a global only
through an exact ``(module, qualname)`` table. What the child's usual pickler
writes does not fit it:

* cloudpickle sends classes of ``__main__`` by value, through its own
  functions (``cloudpickle.cloudpickle._make_skeleton_class`` ...), which the
  parent must refuse;
* the standard pickler names a class by the module it lives in here, which
  under ``spawn`` and ``forkserver`` is ``__mp_main__`` for the parent's
  script, and it refuses a class that is not the very object its module
  holds (the classes of a factory cloudpickle rebuilt are copies).

So this pickler writes each global as ``STACK_GLOBAL(module, qualname)`` from
the object's own ``__module__`` and ``__qualname__``, with ``__mp_main__``
written as ``__main__`` (in the parent that is the script itself), and only
if that name is in the allow-list: an object of a type that is not allowed
fails its call here, with a message that names the type, instead of
breaking the connection in the parent.

Data that names no global at all (ints, strings, lists, dicts ...) is
pickled by the C pickler; anything else by the Python one, which is slower
but lets each global be written by hand.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any, Final

from ._errors import SerializationError

__all__ = ["ByReference", "reference_name"]

#: What ``multiprocessing`` names the parent's main module in a ``spawn``/``forkserver`` child.
_CHILD_MAIN: Final = "__mp_main__"


def reference_name(obj: object, name: str | None = None) -> tuple[str, str]:
    """``(module, qualname)`` that names ``obj`` in the parent: ``__mp_main__`` is ``__main__``."""
    module = getattr(obj, "__module__", None)
    qualname = name if name is not None else getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise pickle.PicklingError(f"{obj!r} has no module and qualified name to be sent by")
    return ("__main__" if module == _CHILD_MAIN else module), qualname


class _NotPlain(Exception):
    """The C pickler met something that is not plain data: take the careful path."""


class _PlainPickler(pickle.Pickler):
    """The C pickler for data that names no global; stops at anything else."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object the C pickler does not handle natively: anything
        # but None, bool, int, float, str, bytes, bytearray, list, tuple, dict, set,
        # frozenset and PickleBuffer.
        raise _NotPlain


class _NotAllowed(pickle.PicklingError):
    """A global that the parent would refuse."""


class _NamedPickler(pickle._Pickler):
    """The Python pickler, writing every global by name if ``allowed`` holds it."""

    # Set by the base class, which is not typed.
    save: Any
    write: Any
    memoize: Any

    def __init__(self, file: io.BytesIO, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(file, 5)
        self._allowed = allowed

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module, qualname = reference_name(obj, name)
        if (module, qualname) not in self._allowed:
            what = "type" if isinstance(obj, type) else type(obj).__name__
            raise _NotAllowed(f"{what} {module}.{qualname}")
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


class ByReference:
    """Pickles values for a restricted parent: globals by name, and only the allowed ones.

    Args:
        allowed: ``(module, qualname)`` of each global the parent resolves (with
            ``__main__`` for the main script, however it is named here).
    """

    def __init__(self, allowed: Iterable[tuple[str, str]]) -> None:
        self.allowed = frozenset(
            ("__main__" if module == _CHILD_MAIN else module, qualname)
            for module, qualname in allowed
        )

    def dumps(self, obj: object, *, what: str) -> bytes:
        """Pickle ``obj`` (protocol 5, in band).

        Raises:
            SerializationError: it holds an object whose type (or a global it needs)
                is not allowed, or it would not pickle; ``what`` names it.
        """
        buffer = io.BytesIO()
        try:
            _PlainPickler(buffer, 5).dump(obj)
            return buffer.getvalue()
        except _NotPlain:
            pass
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # its own code may raise anything (see dumps)
            raise SerializationError(f"{what} could not be pickled: {exc!r}") from exc
        buffer = io.BytesIO()
        try:
            _NamedPickler(buffer, self.allowed).dump(obj)
        except _NotAllowed as exc:
            raise SerializationError(
                f"{what} holds {exc}, which is not in allowed_types: an untrusted child "
                f"sends only plain data and the types its parent allows"
            ) from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise SerializationError(f"{what} could not be pickled: {exc!r}") from exc
        return buffer.getvalue()
