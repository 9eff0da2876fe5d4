"""A pool's streams: a child's stream iterator that gives its child back when it ends.

A stream counts as one call in flight on its child from the call until the
iterator is exhausted, fails, is closed or is dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


class _Counted:
    """Calls ``done(error)`` when the stream ends (``None``: it ended cleanly).

    ``done`` gives the child back once however often it is called, so it is called at
    every end: one an interrupt cut short is made good by the next (a close, or the drop).
    """

    def __init__(self, items: Any, done: Callable[[BaseException | None], None]) -> None:
        self._items = items
        self._done = done

    def _finish(self, error: BaseException | None) -> None:
        self._done(error)

    def close(self) -> None:
        """Stop the stream (the child's generator is closed) and give the child back."""
        try:
            self._items.close()
        finally:
            self._finish(None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a dead connection: nothing to cancel
            pass


class PoolStream(_Counted, Iterator[Any]):
    """The iterator a generator method returns through a pool's proxy."""

    def __iter__(self) -> PoolStream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._items)
        except StopIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(exc)
            raise


class PoolAsyncStream(_Counted, AsyncIterator[Any]):
    """The async iterator ``astream`` returns through a pool's proxy."""

    def __aiter__(self) -> PoolAsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._items.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(exc)
            raise

    async def aclose(self) -> None:
        self.close()
