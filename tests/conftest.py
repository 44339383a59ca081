"""Shared fixtures: one local Ray for the whole session (DESIGN section 5), temporary tl homes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home-for-tests")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs on this 2-core machine, shared by every test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def storage(tmp_path):
    """A fresh tl home per test (outside the repository)."""
    p = tmp_path / "tl-home"
    p.mkdir()
    return p
