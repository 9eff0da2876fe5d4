"""The same services on Ray actors: change ``import pipe_rpc`` for ``import pipe_rpc.ray``.

``pipe_rpc.ray.spawn(factory, ...)`` returns a ``pipe_rpc.Server`` whose child
is a Ray actor; ``pipe_rpc.ray.pool(factory, size=N)`` a pool of N actors. The
proxy, its typing and its errors are pipe_rpc's (see ``docs/ray.md``). This
module imports Ray; ``import pipe_rpc`` never does.
"""

from ._ray_pool import RayPool, pool
from ._ray_server import RayServer, RayStream, spawn

__all__ = ["RayPool", "RayServer", "RayStream", "pool", "spawn"]
