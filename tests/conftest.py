"""Shared fixtures: one local Ray for the whole session (docs/architecture.md, "Ray in this project"), temporary tl homes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray refuses to spill objects once the disk is 95% full (its default); a CI machine's shared disk
# can sit near that, and the spilled blocks of these tests are small
os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.99")
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home-for-tests")
# what a workflow's init_ray sets for its Ray (tl.cluster.WORKER_ENV), for the tests' own Ray too
from tl.cluster import WORKER_ENV  # noqa: E402

for _key, _value in WORKER_ENV.items():
    os.environ.setdefault(_key, _value)
# the local S3 server of tests/test_storage.py takes any key; set before Ray starts, so its workers have them
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs on this 2-core machine, shared by every test."""
    import ray

    if not ray.is_initialized():
        from tl.runtime import CPUS_PER_CORE_VAR

        # as workflows._cli.init_ray says it for its local Ray: its workers run one thread per core they hold
        os.environ[CPUS_PER_CORE_VAR] = f"{max(1.0, 4 / (os.cpu_count() or 1)):g}"
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


@pytest.fixture(scope="session")
def pretrained(ray_local, tmp_path_factory):
    """A quickly pretrained digits backbone (real Ray Train run), shared by the tests that need one.
    It trains with ``augment: shift``, the recipe that reaches 80% source accuracy in these three
    short epochs; the default digits recipe has its own test in test_pretrain.py."""
    from tl.pretrain import PretrainConfig, pretrain

    home = tmp_path_factory.mktemp("pretrained-home")
    res = pretrain(PretrainConfig(epochs=3, limit=1800, batch_size=64, lr=0.05, workers=1, augment="shift"), home)
    assert res.val_accuracy > 0.8, res.val_accuracy
    return str(res.path)
