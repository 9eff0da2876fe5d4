"""One local Ray cluster for the whole run of the Ray tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cluster() -> Iterator[None]:
    """``ray.init(num_cpus=2)``, started once; its workers can import ``tests_ray.services``.

    Workers are started by the cluster's raylet, which passes on this process's
    environment: ``PYTHONPATH`` is how they find the repository.
    """
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
