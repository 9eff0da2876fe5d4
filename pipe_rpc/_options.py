"""The options that shape a child, ``spawn()``'s and ``pool()``'s: checked once into one
frozen record that ``Server`` takes whole, instead of a dozen keywords handed down and
checked again on the way."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

from ._proxy import check_timeout
from ._server import check_max_concurrency

if TYPE_CHECKING:
    from ._limits import Limits

StartMethod = Literal["fork", "forkserver", "spawn"]
OnTimeout = Literal["abandon", "kill"]
RestartPolicy = Literal["never", "on-failure"]

_METHODS = ("fork", "forkserver", "spawn")
_ON_TIMEOUT = ("abandon", "kill")
_RESTART = ("never", "on-failure")


class ServerOptions(NamedTuple):
    """A child's options as ``server_options`` checked them (see ``spawn()`` for each)."""

    timeout: float | None
    start_method: StartMethod | None
    on_timeout: OnTimeout
    restart: RestartPolicy
    max_concurrency: int
    limits: Limits | None
    untrusted: bool
    allowed_types: tuple[type, ...]
    max_reply_bytes: int | None
    name: str | None
    start_timeout: float | None


def server_options(
    factory: object,
    *,
    timeout: float | None = None,
    start_method: StartMethod | None = None,
    on_timeout: OnTimeout = "abandon",
    restart: RestartPolicy = "never",
    max_concurrency: int = 1,
    limits: Limits | None = None,
    untrusted: bool = False,
    name: str | None = None,
    allowed_types: Iterable[type] = (),
    max_reply_bytes: int | None = None,
    start_timeout: float | None = None,
) -> ServerOptions:
    """Check every option (and that ``factory`` is callable) and return them as one record.

    Raises:
        ValueError: an option is out of range.
        TypeError: ``factory`` is not callable.
    """
    if start_method is not None and start_method not in _METHODS:
        raise ValueError(f"start_method must be one of {_METHODS} or None, got {start_method!r}")
    if on_timeout not in _ON_TIMEOUT:
        raise ValueError(f"on_timeout must be one of {_ON_TIMEOUT}, got {on_timeout!r}")
    if restart not in _RESTART:
        raise ValueError(f"restart must be one of {_RESTART}, got {restart!r}")
    check_max_concurrency(max_concurrency)
    if limits is not None:
        from ._limits import Limits

        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a pipe_rpc.Limits or None, got {limits!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    if max_reply_bytes is not None and (
        isinstance(max_reply_bytes, bool)
        or not isinstance(max_reply_bytes, int)
        or max_reply_bytes < 16
    ):
        raise ValueError(f"max_reply_bytes must be None or an int >= 16, got {max_reply_bytes!r}")
    return ServerOptions(
        timeout=check_timeout(timeout),
        start_method=start_method,
        on_timeout=on_timeout,
        restart=restart,
        max_concurrency=max_concurrency,
        limits=limits,
        untrusted=untrusted,
        allowed_types=tuple(allowed_types),
        max_reply_bytes=max_reply_bytes,
        name=name,
        start_timeout=check_timeout(start_timeout, "start_timeout"),
    )
