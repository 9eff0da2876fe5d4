"""The way a server runs ``async def`` methods: on one event loop of the child's own.

The server loop reads and dispatches as ever; a method that returns a coroutine
hands it to the ``CoroutineRunner``, whose thread runs an asyncio loop with up
to ``limit`` coroutines at once (the server's ``max_concurrency``), each as a
task. When one ends, its reply is sent on the channel its call came by, under
the channel's lock. asyncio is imported only by a child that has such a method.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio


class CoroutineRunner:
    """An event loop on a thread of its own, running coroutines ``limit`` at a time.

    Args:
        limit: how many coroutines may run at once.
        finish: ``finish(channel, call, ok, value)`` sends a finished coroutine's reply.
    """

    def __init__(self, limit: int, finish: Callable[[Any, Any, bool, Any], None]) -> None:
        import asyncio

        self._asyncio = asyncio
        self._finish = finish
        self._limit = limit
        self._semaphore: asyncio.Semaphore | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pipe_rpc-async", daemon=True
        )
        self._thread.start()

    def start(self, channel: Any, call: Any, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` (the call ``call`` came by ``channel``) as a task."""
        self._asyncio.run_coroutine_threadsafe(self._run(channel, call, coroutine), self._loop)

    async def _run(self, channel: Any, call: Any, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._semaphore is None:  # made on the loop's own thread
            self._semaphore = self._asyncio.Semaphore(self._limit)
        async with self._semaphore:
            try:
                value = await coroutine
                ok = True
            except BaseException as exc:  # CancelledError too: the caller hears of it
                tb = exc.__traceback__
                if tb is not None and tb.tb_next is not None:
                    exc.__traceback__ = tb.tb_next  # drop this frame from the remote traceback
                ok, value = False, exc
        self._finish(channel, call, ok, value)

    def steps(self, agen: AsyncGenerator[Any, Any]) -> Generator[Any, None, None]:
        """A generator that steps ``agen`` on the runner's loop, one item at a time, for
        the server loop's streams (which advance generators between other work)."""
        asyncio = self._asyncio
        try:
            while True:
                step = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop)
                try:
                    yield step.result()
                except StopAsyncIteration:
                    return
        finally:
            closing = asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop)
            closing.result(5.0)

    def stop(self) -> None:
        """Stop the loop (the child is ending); coroutines still running are dropped."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(1.0)
