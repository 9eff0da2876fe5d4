"""How the server loop runs a call: in place, on a thread pool, as a coroutine, or as a stream.

Theory of operation. The loop (``_server._Loop``) reads and decodes; what a
call becomes once its method has been found is decided here, by what the
method returns and by ``max_concurrency``:

- a plain result, in place: with ``max_concurrency=1`` the loop's own thread
  runs each call in arrival order and the loop writes the replies of what it
  read in one go;
- on a thread pool: with ``N > 1`` each call runs on one of N threads, which
  writes its own reply under its channel's lock (``run_and_reply``);
- as a coroutine: a method that returns one (``async def``) hands it to the
  ``CoroutineRunner``'s event loop, whose thread sends the reply (``_send_reply``);
- as a stream: a generator or async generator becomes an open stream, advanced
  by the loop between other work (``_streams``); its frames go under the
  channel's lock (``_send_locked``).

A reply is encoded by ``reply``, and an exception a call raised is let go of
(``forget``) once its reply is encoded.
"""

from __future__ import annotations

import traceback
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import TYPE_CHECKING, Any

from ._codec import ATOMIC
from ._coroutines import CoroutineRunner
from ._errors import SerializationError
from ._messages import Call, Fail, FailKind, Get
from ._protocol import ServerProtocol
from ._transport import PeerGone
from ._wire import Buffer

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from ._dispatch import Dispatcher
    from ._server_channels import ServerChannel
    from ._streams import Streams


def reply(protocol: ServerProtocol, call: Call | Get, ok: bool, value: Any) -> list[Buffer]:
    """The frame answering ``call``; a result or exception that fails to pickle in any
    way is a serialization failure of this call alone.

    Pickling runs the value's own code (``__reduce__``), which may raise any
    ``BaseException``; the encoder turns an ``Exception`` into a ``Fail``
    already. Only ``KeyboardInterrupt`` ends the server.
    """
    codec = protocol.codec
    method = call.method if type(call) is Call else call.name  # type: ignore[union-attr]
    try:
        if codec.by_reference is not None and not isinstance(value, Fail):
            return codec.encode_reply_by_reference(call.call_id, ok, value, method)
        return protocol.reply(call.call_id, ok, value, method)
    except SerializationError as exc:
        return codec.encode(Fail(call.call_id, FailKind.SERIALIZATION, str(exc)))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        what = "result" if ok else "exception"
        message = f"the {what} of {method}() could not be pickled: {exc!r}"
        return protocol.codec.encode(Fail(call.call_id, FailKind.SERIALIZATION, message))


def forget(error: object) -> None:
    """Let go of what a raised ``error`` keeps alive, once its reply is encoded (a
    result is left alone, even an exception: the service may still use it).

    Its traceback holds the frames of the call, and they hold its locals (a big
    buffer, say) until the cyclic collector runs if there is a cycle among them,
    which there often is (a frame holding the exception it caught). Clearing the
    frames' locals and unlinking the tracebacks, also of the exceptions chained
    to it or grouped in it, frees them at once. A service that keeps the exception
    it raised keeps it without its traceback.
    """
    if not isinstance(error, BaseException):
        return
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        linked = (exc.__cause__, exc.__context__)
        exc.__cause__ = exc.__context__ = None
        pending.extend(e for e in linked if e is not None)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)


def thread_pool(max_concurrency: int) -> ThreadPoolExecutor | None:
    """The threads that run calls, with ``max_concurrency > 1`` (``None``: the loop's own)."""
    if max_concurrency <= 1:
        return None
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_concurrency, thread_name_prefix="pipe_rpc-call")


class RunStrategies:
    """The server loop's ways of running a call (see the module's docstring)."""

    dispatcher: Dispatcher
    #: The threads that run calls, with ``max_concurrency > 1``.
    pool: ThreadPoolExecutor | None
    max_concurrency: int
    #: Runs the coroutines of ``async def`` methods, from the first such call on.
    coroutines: CoroutineRunner | None
    #: The open streams of generator methods, advanced between other work.
    streams: Streams
    #: A plain result is encoded as it is (the codec does not pickle by reference).
    plain: bool

    def run_call(self, channel: ServerChannel, call: Call | Get) -> list[Buffer] | None:
        """Run ``call`` and return its reply, or ``None`` if it goes on as a coroutine
        (an ``async def`` method), whose reply the coroutine runner sends."""
        ok, value = self.dispatcher.run(call)
        if ok and type(value) in ATOMIC and self.plain:  # its pickling runs no code of its own
            return channel.protocol.codec.encode_return(call.call_id, value)
        if ok and type(value) in (GeneratorType, AsyncGeneratorType):
            assert type(call) is Call
            if type(value) is AsyncGeneratorType:
                value = self._coroutine_runner().steps(value)
            self.streams.start(channel, call, value)
            return None
        if ok and type(value) is CoroutineType:
            self._coroutine_runner().start(channel, call, value)
            return None
        try:
            return reply(channel.protocol, call, ok, value)
        finally:
            if not ok:
                forget(value)

    def _coroutine_runner(self) -> CoroutineRunner:
        if self.coroutines is None:
            self.coroutines = CoroutineRunner(self.max_concurrency, _send_reply)
        return self.coroutines

    def run_and_reply(self, channel: ServerChannel, call: Call | Get) -> None:
        frame = self.run_call(channel, call)
        if frame is not None:
            try:
                channel.send(frame)
            except PeerGone:
                pass

    def stop_runs(self) -> None:
        """Wait for the calls running on threads, stop the coroutines, close the streams."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.coroutines is not None:
            self.coroutines.stop()
        self.streams.close_all()


def send_locked(channel: ServerChannel, frame: list[Buffer]) -> None:
    try:
        channel.send(frame)
    except PeerGone:
        pass


def _send_reply(channel: ServerChannel, call: Call | Get, ok: bool, value: Any) -> None:
    """Send the reply of a call that ran as a coroutine (from the runner's thread)."""
    try:
        frame = reply(channel.protocol, call, ok, value)
    finally:
        if not ok:
            forget(value)
    del value
    try:
        channel.send(frame)
    except PeerGone:
        pass
