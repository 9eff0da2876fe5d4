"""``Pool.map``'s chunks: many items of one method in one call, and back.

A chunk is a call of the reserved name ``MAP`` (no service can have it: a public
name has no dot) with the method's name and a list of items. The child runs the
method on each item in turn (``run_chunk``) and answers with one pickle of every
outcome: the results in order, the exceptions as exception payloads by index,
and how long the items took, from which the parent sizes the next chunk. A
result that will not pickle fails its own item only.

A crash fails the whole chunk: its items that ran left no reply. So the parent
sends items one per call until it knows they are quick, and sizes each chunk to
about a millisecond of the child's work (see ``_pool_map``).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

from ._decoding import exception_from
from ._errors import ProtocolError, SerializationError
from ._pickling import dumps
from ._remote_errors import exception_payload
from ._server_runs import forget

#: The reserved method name of a chunk: ``(name, items)``.
MAP = ".map"

#: A chunk's outcomes: the results (``None`` where an item raised), the exception
#: payloads of the items that raised, by index, and the child's time in nanoseconds.
Outcomes = tuple[list[Any], dict[int, bytes], int]


def run_chunk(method: Callable[[Any], Any], items: list[Any], name: str) -> bytes:
    """Run ``method`` on each item (in the child): the pickle of their ``Outcomes``."""
    results: list[Any] = []
    errors: dict[int, bytes] = {}
    rest = iter(items)
    started = time.perf_counter_ns()
    while True:
        try:
            # In C: each result is appended as it comes, so when an item raises, the
            # results before it are kept, and the next round goes on after it.
            results.extend(map(method, rest))
            break
        except BaseException as exc:  # as a call's would, it goes back to the caller
            if exc.__traceback__ is not None:
                exc.__traceback__ = exc.__traceback__.tb_next  # not this frame
            errors[len(results)] = exception_payload(exc)
            results.append(None)
            forget(exc)
    outcomes = (results, errors, time.perf_counter_ns() - started)
    try:
        return dumps(outcomes, what=f"the results of {name}()")
    except SerializationError:
        return dumps(_one_by_one(results, errors, name), what=f"the results of {name}()")


def _one_by_one(results: list[Any], errors: dict[int, bytes], name: str) -> Outcomes:
    """The outcomes with each result that will not pickle made its item's failure."""
    for index, result in enumerate(results):
        if index in errors:
            continue
        try:
            dumps(result, what=f"the result of {name}()")
        except SerializationError as exc:
            errors[index] = exception_payload(exc)
            results[index] = None
    return results, errors, 0


def open_chunk(blob: object, count: int) -> Outcomes:
    """The ``Outcomes`` of a chunk of ``count`` items, from its call's result.

    Raises:
        ProtocolError: the child's answer is not a chunk's.
    """
    try:
        results, errors, elapsed = pickle.loads(blob)  # type: ignore[arg-type]
        if len(results) != count or not isinstance(errors, dict):
            raise ValueError(f"{len(results)} results for {count} items")
        return results, errors, int(elapsed)
    except (Exception, SystemExit) as exc:
        raise ProtocolError(f"a map chunk's answer is malformed: {exc!r}") from exc


def item_error(outcomes: Outcomes, index: int) -> BaseException:
    """The exception the chunk's item ``index`` raised (it must have)."""
    return exception_from(pickle.loads(outcomes[1][index]), None)
