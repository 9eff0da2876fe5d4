"""One Ray actor seen from the caller: starting it, knowing of its death, ending it.

Theory of operation. Each actor is a ``ServiceActor`` (``_ray_actor``) made
with ``max_restarts=0`` and ``max_task_retries=0``: Ray never restarts it or
retries a call on its own, so a call in flight when it dies always fails, and
replacing it is the server's to do. Besides the calls, each actor runs one
``watch()`` task in a concurrency group of its own; its reference fails the
moment the actor dies, and a callback on it marks the ``Actor`` dead, so a
death while idle is known without a message per call. Ray's words for a death
are kept (``death_reason``) and counted by a word (``death_word``).
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from ._errors import StartupError, describe_exitcode
from ._messages import Kind
from ._ray_actor import Raised, ServiceActor

_ACTOR_CLASS: Any = None
_INIT_LOCK = threading.Lock()


def ensure_ray() -> Any:
    """Join the Ray cluster the program has joined, or start a local one; the actor class."""
    global _ACTOR_CLASS
    with _INIT_LOCK:
        if not ray.is_initialized():
            ray.init()
        if _ACTOR_CLASS is None:
            _ACTOR_CLASS = ray.remote(concurrency_groups={"watch": 1})(ServiceActor)
        return _ACTOR_CLASS


def death_reason(error: BaseException | None) -> str:
    """Ray's own words for an actor's death, without its list of common causes."""
    text = "" if error is None else str(error)
    _, found, after = text.partition("The actor is dead because ")
    if found:
        text = after
    text = text.split(" Some common causes", 1)[0].strip()
    return text or f"{type(error).__name__} from Ray"


def death_word(error: BaseException | None) -> str:
    """A death's reason in a word, as far as Ray's message tells it: ``"exit 3"``,
    ``"SIGSEGV"``; ``"unknown"`` when it gives no exit code."""
    text = "" if error is None else str(error)
    found = re.search(r"exit(?:ed)? (?:with )?(?:an )?(?:exit )?code (-?\d+)", text)
    if found is None:
        return "unknown"
    code = int(found.group(1))
    if code < 0:
        return describe_exitcode(code).removeprefix("killed by ")
    if code > 128 and code - 128 in _SIGNALS:  # a shell's way of saying "killed by"
        return _SIGNALS[code - 128]
    return f"exit {code}"


_SIGNALS = {int(s): s.name for s in signal.Signals}


class Actor:
    """One Ray actor serving one service, and what we know of its end."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.hello: ray.ObjectRef[tuple[int, Raised | None, dict[str, int]]] = handle.hello.remote()
        self.pid: int | None = None
        self.kinds: dict[str, Kind] = {}  # the service's methods that are not plain ones
        #: Told a death's reason in a word (``"SIGKILL"``, ``"exit 3"``), once; not a close.
        self.on_death: Callable[[str], None] | None = None
        self.dead: str | None = None  # why it ended, once it has
        self._watch: ray.ObjectRef[None] | None = None

    @classmethod
    def launch(cls, factory: Callable[[], object], options: dict[str, Any]) -> Actor:
        """Ask Ray for the actor; returns before it is up (``ready()`` waits)."""
        return cls(ensure_ray().options(**options).remote(factory))

    def ready(self, timeout: float | None) -> None:
        """Wait for the service to be built; ``StartupError`` if it was not, and the actor dies."""
        try:
            pid, startup, kinds = ray.get(self.hello, timeout=timeout)
        except GetTimeoutError:
            self.kill("it did not start in time")
            raise StartupError(f"the Ray actor did not start within {timeout} s") from None
        except RayError as exc:
            self.kill("it failed while starting")
            raise StartupError(f"the Ray actor failed while starting: {death_reason(exc)}") from exc
        self.pid = pid
        self.kinds = {name: Kind(kind) for name, kind in kinds.items()}
        if startup is not None:
            self.kill("its factory raised")
            raise startup.startup_error()
        self._watch = self.handle.watch.options(concurrency_group="watch").remote()
        self._watch.future().add_done_callback(self._ended)

    def _ended(self, future: Future[None]) -> None:
        self.died(future.exception())

    def died(self, error: BaseException | None, word: str | None = None) -> None:
        """The actor is dead (``error``: Ray's word of it); the first word counts."""
        if self.dead is None:
            self.dead = death_reason(error)
            if self.on_death is not None:
                self.on_death(word or death_word(error))

    def kill(self, reason: str) -> None:
        """End the actor now (``ray.kill``: no graceful exit)."""
        if self.dead is None:
            self.dead = reason
            if self.on_death is not None:
                self.on_death("SIGKILL")
        kill_actor(self.handle)

    def begin_close(self) -> ray.ObjectRef[Any] | None:
        """Ask the actor to exit once its calls in flight are done; the reference to wait on."""
        if self.dead is not None:
            return None
        self.dead = "it was closed"
        try:
            self.handle.release.remote()  # watch() would hold the exit up
            ref: ray.ObjectRef[Any] = self.handle.__ray_terminate__.remote()
        except RayError:
            return None
        return ref


def kill_actor(handle: Any) -> None:
    try:
        if ray.is_initialized():
            ray.kill(handle, no_restart=True)
    except (RayError, ValueError):  # already gone, or Ray shut down under us
        pass


def finish_close(actors: list[tuple[Actor, ray.ObjectRef[Any] | None]], timeout: float) -> None:
    """Wait up to ``timeout`` s in all for graceful exits, then kill every actor."""
    refs = [ref for _, ref in actors if ref is not None]
    if refs and timeout > 0:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except RayError:
            pass
    for actor, _ in actors:
        kill_actor(actor.handle)


class Holder:
    """The current actor's handle, for the finalizer (which must not hold the server)."""

    def __init__(self) -> None:
        self.handle: Any = None

    def kill(self) -> None:
        if self.handle is not None:
            kill_actor(self.handle)
