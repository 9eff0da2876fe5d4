"""The items of a generator method on a Ray actor: ``RayStream``.

Ray's streaming generator (``ObjectRefGenerator``) carries them as the actor
yields them, for ``for`` or ``async for``; ``close()`` cancels the task, so the
service's generator is closed and its ``finally`` runs. A stream counts as one
call, ended once: by its end, its failure, or its consumer leaving early.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import ray
from ray.exceptions import GetTimeoutError, RayError, TaskCancelledError

from ._errors import CallTimeoutError
from ._ray_actor import Raised
from ._stats import ERROR, OK, TIMEOUT, Counters

if TYPE_CHECKING:
    from ._ray_calls import RayCalls
    from ._ray_handle import Actor

T = TypeVar("T")


class RayStream(Generic[T]):
    """The items of a generator method on a Ray actor, to iterate with ``for`` or
    ``async for`` (Ray's own ``ObjectRefGenerator`` either way); ``close()`` and
    ``aclose()`` cancel the task."""

    def __init__(
        self,
        server: RayCalls,
        actor: Actor,
        name: str,
        generator: ray.ObjectRefGenerator,
        timeout: float | None,
    ) -> None:
        self._server = server
        self._actor = actor
        self._name = name
        self._generator: ray.ObjectRefGenerator | None = generator
        self._timeout = timeout
        self._counters: Counters | None = server._counters  # until the stream's end is counted
        self._started = server._counters.begin(name)

    def _end(self, outcome: int) -> None:
        """Count the stream's end, once: a stream counts as one call."""
        counters, self._counters = self._counters, None
        if counters is not None:
            counters.end(self._name, self._started, outcome)

    def _failed(self, exc: BaseException) -> Exception:
        failure = self._server._failure(self._actor, self._name, exc, self._timeout)
        self._end(TIMEOUT if isinstance(failure, CallTimeoutError) else ERROR)
        self.close()
        return failure

    def __iter__(self) -> RayStream[T]:
        return self

    def __next__(self) -> T:
        generator = self._generator
        if generator is None:
            raise StopIteration
        try:
            if self._timeout is not None:
                ready, _ = ray.wait([generator], timeout=self._timeout)
                if not ready:
                    raise GetTimeoutError("no item in time")
            ref = next(generator)
            value = ray.get(ref)
        except StopIteration:
            self._generator = None
            self._end(OK)
            raise
        except (RayError, TimeoutError) as exc:
            raise self._failed(exc) from None
        return self._item(value)

    def __aiter__(self) -> RayStream[T]:
        return self

    async def __anext__(self) -> T:
        generator = self._generator
        if generator is None:
            raise StopAsyncIteration
        try:
            ref = await asyncio.wait_for(generator.__anext__(), self._timeout)
            value = await ref
        except StopAsyncIteration:
            self._generator = None
            self._end(OK)
            raise
        except asyncio.CancelledError:  # the awaiting task was cancelled: the stream ends
            self._end(TIMEOUT)
            self.close()
            raise
        except (RayError, TimeoutError) as exc:
            raise self._failed(exc) from None
        return self._item(value)

    def _item(self, value: Any) -> T:
        if type(value) is Raised:
            self._generator = None
            self._end(ERROR)
            raise value.rebuild()
        return cast(T, value)

    def close(self) -> None:
        """Stop the actor's generator (its ``finally`` runs); idempotent."""
        self._end(OK)  # a stream left early ended as its consumer wished
        generator, self._generator = self._generator, None
        if generator is not None and not generator.is_finished():
            try:
                ray.cancel(generator)
            except (RayError, TaskCancelledError, ValueError):
                pass

    async def aclose(self) -> None:
        """``close()``, for ``async for``'s callers."""
        self.close()

    def __enter__(self) -> RayStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
