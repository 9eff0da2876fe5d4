"""``pipe_rpc.ray`` on a real local Ray cluster (``conftest.py`` starts it once).

No sleeps wait for a condition: ``eventually()`` polls with a deadline. Nothing
asserts on timings.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import pipe_rpc
import pipe_rpc.ray as pipe_rpc_ray
from pipe_rpc._ray_server import RayServer
from tests_ray.services import BrokenFactory, Service, ServiceError, TwoPartError

ROOT = Path(__file__).resolve().parent.parent
#: Seconds any single wait in these tests may take; Ray's own steps are slow on 2 cores.
DEADLINE = 60.0


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.02)


def process_gone(pid: int | None) -> Callable[[], bool]:
    assert pid is not None

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    return gone


@pytest.fixture
def server() -> Iterator[pipe_rpc.Server[Service]]:
    with_server = pipe_rpc_ray.spawn(Service, timeout=DEADLINE, start_timeout=DEADLINE)
    try:
        yield with_server
    finally:
        with_server.close()


# -- calls and errors ----------------------------------------------------------------


def test_a_call_returns_its_value_from_the_actor(server: pipe_rpc.Server[Service]) -> None:
    assert isinstance(server, pipe_rpc.Server)
    assert server.proxy.add(1, 2) == 3
    actor_pid = server.proxy.pid()
    assert actor_pid == server.pid
    assert actor_pid != os.getpid()
    assert server.is_alive()
    assert server.exitcode is None


def test_a_remote_exception_keeps_its_type_args_and_traceback(
    server: pipe_rpc.Server[Service],
) -> None:
    with pytest.raises(ServiceError) as caught:
        server.proxy.fail("no luck")
    assert caught.value.args == ("no luck",)
    cause = caught.value.__cause__
    assert isinstance(cause, pipe_rpc.RemoteTraceback)
    assert re.search(r'services\.py", line \d+, in fail\n\s+raise ServiceError', str(cause))
    with pytest.raises(TwoPartError) as parts:
        server.proxy.fail_in_parts()
    assert parts.value.code == 7
    assert server.proxy.add(2, 2) == 4  # the actor lives on


def test_system_exit_comes_back_as_remote_error_and_the_actor_lives(
    server: pipe_rpc.Server[Service],
) -> None:
    with pytest.raises(pipe_rpc.RemoteError) as caught:
        server.proxy.exit()
    assert caught.value.remote_type == "builtins.SystemExit"
    assert server.proxy.add(1, 1) == 2


def test_values_that_do_not_pickle_fail_only_their_call(
    server: pipe_rpc.Server[Service],
) -> None:
    with pytest.raises(pipe_rpc.SerializationError, match=r"lock\(\).*cannot pickle"):
        server.proxy.lock()
    with pytest.raises(pipe_rpc.SerializationError, match=r"argument of nap\(\)"):
        server.proxy.nap(threading.Lock())  # type: ignore[arg-type]
    assert server.proxy.add(1, 2) == 3


def test_only_public_methods_can_be_called(server: pipe_rpc.Server[Service]) -> None:
    with pytest.raises(pipe_rpc.MethodNotFoundError, match="only public methods"):
        server.invoke("_private", (), {}, None)
    with pytest.raises(pipe_rpc.MethodNotFoundError, match="no public method 'nope'"):
        server.invoke("nope", (), {}, None)
    assert not hasattr(server.proxy, "_private")


# -- deaths, timeouts, restarts ------------------------------------------------------


def test_os_exit_in_the_actor_raises_worker_died_error() -> None:
    server = pipe_rpc_ray.spawn(Service, start_timeout=DEADLINE)
    try:
        pid = server.pid
        with pytest.raises(pipe_rpc.WorkerDiedError) as caught:
            server.proxy.die()
        assert caught.value.exitcode is None  # Ray does not report it
        assert "die()" in str(caught.value)
        assert str(pid) in str(caught.value)
        assert not server.is_alive()
        with pytest.raises(pipe_rpc.WorkerDiedError, match="has died"):
            server.proxy.add(1, 2)  # restart="never": dead for good
        eventually(process_gone(pid), "the actor's worker process ends")
    finally:
        server.close()


def test_a_timeout_with_kill_ends_the_actor() -> None:
    server = pipe_rpc_ray.spawn(Service, on_timeout="kill", start_timeout=DEADLINE)
    try:
        pid = server.pid
        with pytest.raises(pipe_rpc.CallTimeoutError, match=r"nap\(\)") as caught:
            pipe_rpc.options(server.proxy, timeout=0.5).nap(DEADLINE)
        assert isinstance(caught.value, TimeoutError)
        eventually(process_gone(pid), "the timed-out actor's process ends")
        with pytest.raises(pipe_rpc.WorkerDiedError):
            server.proxy.add(1, 2)
    finally:
        server.close()


def test_a_timeout_that_abandons_keeps_the_actor_and_drops_the_late_reply(
    server: pipe_rpc.Server[Service],
) -> None:
    with pytest.raises(pipe_rpc.CallTimeoutError):
        pipe_rpc.options(server.proxy, timeout=0.2).nap(1.0)
    assert server.proxy.add(2, 3) == 5  # its own reply, after the abandoned nap ends
    assert server.is_alive()


def test_restart_on_failure_replaces_the_actor_for_the_next_call() -> None:
    server = pipe_rpc_ray.spawn(Service, restart="on-failure", start_timeout=DEADLINE)
    try:
        first = server.pid
        assert server.proxy.bump() == 1
        with pytest.raises(pipe_rpc.WorkerDiedError):
            server.proxy.die()  # the call in flight is never retried
        assert server.proxy.bump() == 1  # a fresh service from the factory
        assert server.pid not in (None, first)
        assert server.proxy.pid() == server.pid
    finally:
        server.close()


def test_a_death_while_idle_is_seen_and_the_next_call_goes_to_a_fresh_actor() -> None:
    server = pipe_rpc_ray.spawn(Service, restart="on-failure", start_timeout=DEADLINE)
    try:
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # not through any call
        eventually(lambda: not server.is_alive(), "the death is seen while idle")
        assert server.proxy.add(1, 2) == 3  # no call fails for it
        assert server.pid != first
    finally:
        server.close()


def test_restart_and_kill_by_hand() -> None:
    server = pipe_rpc_ray.spawn(Service, start_timeout=DEADLINE)
    try:
        first = server.pid
        server.restart()
        assert server.pid != first
        eventually(process_gone(first), "the replaced actor's process ends")
        assert server.proxy.add(1, 2) == 3
        second = server.pid
        server.kill()
        assert not server.is_alive()
        eventually(process_gone(second), "the killed actor's process ends")
        with pytest.raises(pipe_rpc.WorkerDiedError):
            server.proxy.add(1, 2)
    finally:
        server.close()


def test_close_lets_the_actor_exit_and_is_idempotent() -> None:
    server = pipe_rpc_ray.spawn(Service, start_timeout=DEADLINE)
    pid = server.pid
    with server as proxy:
        assert proxy.add(1, 2) == 3
    eventually(process_gone(pid), "the closed actor's process ends")
    assert not server.is_alive()
    with pytest.raises(pipe_rpc.ClientClosedError):
        server.proxy.add(1, 2)
    with pytest.raises(pipe_rpc.ClientClosedError), server:
        pass
    server.close()


def test_a_factory_that_raises_is_a_startup_error() -> None:
    with pytest.raises(pipe_rpc.StartupError, match="the factory refuses") as caught:
        pipe_rpc_ray.spawn(BrokenFactory, start_timeout=DEADLINE)
    assert "in __init__" in caught.value.remote_traceback


def test_options_that_ray_cannot_honour_are_value_errors() -> None:
    for keywords in [
        {"start_method": "fork"},
        {"limits": pipe_rpc.Limits(open_files=64)},
        {"untrusted": True},
        {"ray_options": {"max_restarts": 3}},
        {"on_timeout": "wait"},
        {"max_concurrency": 0},
    ]:
        with pytest.raises(ValueError, match=r"start_method|limits|untrusted|max_r|on_t|max_c"):
            pipe_rpc_ray.spawn(Service, **keywords)  # type: ignore[arg-type]


def test_max_concurrency_runs_calls_at_once() -> None:
    """Two calls meet at a barrier in the actor: only possible if both run at the same time."""
    server = pipe_rpc_ray.spawn(Service, max_concurrency=2, start_timeout=DEADLINE)
    try:
        results: list[object] = []
        threads = [
            threading.Thread(target=lambda: results.append(server.proxy.meet(2, DEADLINE)))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert results == [True, True]
    finally:
        server.close()


def test_ray_options_reach_the_actor_class() -> None:
    server = pipe_rpc_ray.spawn(
        Service, ray_options={"name": "pipe-rpc-named"}, start_timeout=DEADLINE
    )
    try:
        named = ray.get_actor("pipe-rpc-named")
        assert ray.get(named.hello.remote())[0] == server.pid
    finally:
        server.close()


def test_a_ray_server_overrides_every_public_member_of_server() -> None:
    """``Server.__init__`` is not called, so an inherited member would find no child."""
    public = {
        name
        for name in dir(pipe_rpc.Server)
        if not name.startswith("_") or name in ("__enter__", "__repr__")
    }
    # Its own classes: RayServer and the front-end it inherits ahead of Server.
    own = [klass for klass in RayServer.__mro__ if not issubclass(pipe_rpc.Server, klass)]
    missing = sorted(name for name in public if not any(name in vars(k) for k in own))
    assert not missing, f"RayServer inherits these from Server: {missing}"


# -- the pool ------------------------------------------------------------------------


def test_a_pool_maps_and_broadcasts() -> None:
    with pipe_rpc_ray.pool(Service, size=2, start_timeout=DEADLINE) as proxy:
        pool = proxy_pool(proxy)
        assert pool.size == 2
        pids = pool.broadcast(proxy.pid)
        assert pids == pool.pids
        assert len(set(pids)) == 2
        assert list(pool.map(proxy.square, range(8))) == [x * x for x in range(8)]
        unordered = list(pool.map(proxy.slow_square, range(6), ordered=False))
        assert sorted(unordered) == [x * x for x in range(6)]
        failing = pool.map(proxy.fail_on, range(6))
        assert [next(failing) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ServiceError, match="no 3"):
            next(failing)


def test_a_pool_sends_a_call_to_the_least_busy_actor() -> None:
    with pipe_rpc_ray.pool(Service, size=2, start_timeout=DEADLINE) as proxy:
        pool = proxy_pool(proxy)
        release = threading.Thread(target=proxy.nap, args=(3.0,))
        release.start()
        eventually(lambda: sum(pool._busy) == 1, "one actor is busy")
        idle = pool.pids[pool._busy.index(0)]
        assert [proxy.pid() for _ in range(3)] == [idle] * 3
        release.join(DEADLINE)


def test_a_pool_survives_the_death_of_an_actor() -> None:
    with pipe_rpc_ray.pool(Service, size=2, start_timeout=DEADLINE) as proxy:
        pool = proxy_pool(proxy)
        before = pool.pids
        with pytest.raises(pipe_rpc.WorkerDiedError):
            proxy.die()
        after = pool.broadcast(proxy.pid)
        assert len(set(after) & set(before)) == 1  # one replaced, one kept


def proxy_pool(proxy: Service) -> pipe_rpc_ray.RayPool[Service]:
    pool = proxy._pipe_rpc_invoker  # type: ignore[attr-defined]
    assert isinstance(pool, pipe_rpc_ray.RayPool)
    return pool


# -- async and streaming (for the future acall and streams) --------------------------


def test_acall_awaits_a_call_and_its_errors(server: pipe_rpc.Server[Service]) -> None:
    assert isinstance(server, RayServer)

    async def main() -> None:
        assert await server._acall("add", (1, 2), {}) == 3
        with pytest.raises(ServiceError):
            await server._acall("fail", ("async",), {})
        with pytest.raises(pipe_rpc.CallTimeoutError):
            await server._acall("nap", (1.0,), {}, 0.2)

    asyncio.run(main())


def test_a_stream_yields_items_and_close_stops_the_generator(
    server: pipe_rpc.Server[Service], tmp_path: Path
) -> None:
    assert isinstance(server, RayServer)
    whole = tmp_path / "whole"
    assert list(server._stream("count_to", (4, str(whole)), {})) == [0, 1, 2, 3]
    mark = tmp_path / "closed"
    stream = server._stream("count_to", (10_000, str(mark)), {})
    assert next(stream) == 0
    stream.close()
    eventually(mark.exists, "the actor's generator ran its finally")
    assert server.proxy.add(1, 2) == 3  # the slot is free again
    with pytest.raises(pipe_rpc.MethodNotFoundError):
        list(server._stream("nope", (), {}))


def test_astream_iterates_a_stream_on_the_loop_and_closes_it_early(
    server: pipe_rpc.Server[Service], tmp_path: Path
) -> None:
    """``astream`` takes a Ray proxy's generator and async generator methods; leaving
    the loop early stops the actor's generator (its ``finally`` runs)."""

    async def take(method: Any, n: int, mark: Path, stop: int | None = None) -> list[int]:
        got = []
        async for item in pipe_rpc.astream(method, n, str(mark)):
            got.append(item)
            if stop is not None and len(got) == stop:
                break
        return got

    async def main() -> None:
        proxy = server.proxy
        assert await take(proxy.count_to, 4, tmp_path / "a") == [0, 1, 2, 3]
        assert await take(proxy.acount_to, 4, tmp_path / "b") == [0, 1, 2, 3]
        assert await take(proxy.count_to, 10_000, tmp_path / "c", stop=2) == [0, 1]
        assert await take(proxy.acount_to, 10_000, tmp_path / "d", stop=2) == [0, 1]
        assert [i async for i in proxy.acount_to(3, str(tmp_path / "e"))] == [0, 1, 2]

    asyncio.run(asyncio.wait_for(main(), DEADLINE))
    for name in "abcde":
        eventually((tmp_path / name).exists, f"generator {name} ran its finally")
    assert server.proxy.add(1, 2) == 3
    assert list(server.proxy.count_to(3, str(tmp_path / "f"))) == [0, 1, 2]


def test_stats_count_calls_of_every_kind_and_a_death_by_its_reason(tmp_path: Path) -> None:
    server = pipe_rpc_ray.spawn(Service, restart="on-failure", start_timeout=DEADLINE)
    try:
        proxy = server.proxy
        assert proxy.add(1, 2) == 3
        assert asyncio.run(asyncio.wait_for(pipe_rpc.acall(proxy.add, 1, 2), DEADLINE)) == 3
        assert pipe_rpc.submit(proxy.add, 1, 2).result(DEADLINE) == 3
        assert list(proxy.count_to(2, str(tmp_path / "mark"))) == [0, 1]
        with pytest.raises(pipe_rpc.WorkerDiedError):
            proxy.die()  # os._exit(3)
        assert proxy.add(1, 2) == 3  # a fresh actor
        stats = server.stats()
        assert stats.methods["add"].calls == 4
        assert stats.methods["count_to"].calls == 1
        assert stats.methods["die"].errors == 1
        assert (stats.starts, stats.restarts) == (2, 1)
        assert stats.deaths == {"unknown": 1}  # Ray's message names no exit code for it
    finally:
        server.close()


def test_a_pools_stats_sum_its_actors() -> None:
    pool = pipe_rpc_ray.pool(Service, size=2, start_timeout=DEADLINE)
    with pool as proxy:
        assert list(pool.map(proxy.square, range(10))) == [x * x for x in range(10)]
        assert proxy.add(1, 2) == 3
        stats = pool.stats()
        assert stats.methods["square"].calls == 10
        assert stats.methods["add"].calls == 1
        assert stats.starts == 2


# -- the boundary and the example ----------------------------------------------------


def test_import_pipe_rpc_does_not_import_ray_even_where_ray_is_installed() -> None:
    code = "import sys, pipe_rpc; print('ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_ray_example_runs() -> None:
    """``examples/ray_cluster.py``: it starts its own local cluster (no ``ray.init`` in it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / "ray_cluster.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    # Ray's raylet prints its own note of the crash on our standard output: not ours to check.
    lines = [line for line in result.stdout.splitlines() if "(raylet)" not in line]
    assert lines == [
        "add(1, 2) = 3",
        "caught KeyError: 'missing' (remote traceback attached: True)",
        "the actor died: WorkerDiedError",
        "a fresh actor answers: add(2, 3) = 5",
        "squares: [0, 1, 4, 9, 16]",
    ], report


def test_acall_and_submit_work_on_a_ray_proxy(server: pipe_rpc.Server[Service]) -> None:
    """The asyncio and futures front-ends take a Ray proxy's methods as they take a
    local one's: same functions, same errors."""

    async def main() -> list[int]:
        return await asyncio.gather(*(pipe_rpc.acall(server.proxy.add, i, 1) for i in range(8)))

    assert asyncio.run(asyncio.wait_for(main(), DEADLINE)) == list(range(1, 9))
    assert pipe_rpc.submit(server.proxy.add, 2, 3).result(DEADLINE) == 5
    failing = pipe_rpc.submit(server.proxy.fail, "boom")
    with pytest.raises(ServiceError):
        failing.result(DEADLINE)
