"""Pickling a payload: the standard pickler first, cloudpickle as the fallback.

The standard pickler is tried first (it is several times faster); cloudpickle
is used when it fails, or when the pickle of at most ``MAIN_SCAN_LIMIT`` bytes
names ``__main__`` (cloudpickle sends such objects by value, so they also work
in a child that cannot import the parent's ``__main__``; a larger pickle is not
scanned, as the scan would cost as much as the copy). cloudpickle is imported
when first needed, and refuses open files: a file is never sent as a value.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ._errors import SerializationError


def dumps(obj: object, *, what: str, buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Pickle ``obj`` (standard pickle first, cloudpickle as the fallback).

    Raises:
        SerializationError: neither could pickle it; ``what`` names it in the message.
    """
    callback = None if buffers is None else buffers.append
    try:
        data = pickle.dumps(obj, 5, buffer_callback=callback)
        if not names_main(data):
            return data
    except KeyboardInterrupt:
        raise
    except (
        BaseException
    ):  # a __reduce__ may raise anything: GeneratorExit, a BaseException of its own
        pass
    if buffers is not None:
        buffers.clear()
    try:
        return _cloudpickle_dumps(obj, callback)
    except KeyboardInterrupt:
        raise
    except _OpenFileError as exc:
        raise SerializationError(
            f"{what} could not be pickled: it holds an open file ({exc}); "
            "send its contents or its path instead"
        ) from None
    except BaseException as exc:
        raise SerializationError(f"{what} could not be pickled: {exc!r}") from exc


class _OpenFileError(TypeError):
    """An open file object met while pickling: never sent as a value."""


def _cloudpickle_dumps(obj: object, callback: Any) -> bytes:
    """``cloudpickle.dumps``, refusing open files (it would send a text file's
    contents as a ``StringIO`` and leave the file open where it was)."""
    global _Pickler
    if _Pickler is None:
        import cloudpickle

        class _RefusingPickler(cloudpickle.Pickler):
            def reducer_override(self, value: Any) -> Any:
                if isinstance(value, io.IOBase):
                    raise _OpenFileError(repr(value))
                return super().reducer_override(value)

        _Pickler = _RefusingPickler
    out = io.BytesIO()
    _Pickler(out, 5, buffer_callback=callback).dump(obj)
    return out.getvalue()


#: cloudpickle's pickler that refuses open files, made when first needed.
_Pickler: Any = None

#: Pickles up to this size are scanned for references to ``__main__``.
MAIN_SCAN_LIMIT = 1 << 14


def names_main(data: bytes) -> bool:
    """Is ``data`` a pickle of at most ``MAIN_SCAN_LIMIT`` bytes that names ``__main__``?"""
    # find() rather than `in`: bytes.__contains__ first tries the needle as an int.
    return len(data) <= MAIN_SCAN_LIMIT and data.find(b"__main__") >= 0
