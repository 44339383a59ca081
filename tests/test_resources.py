"""GPUs where the cluster has them, nothing changed where it has none: the resource requests of
cells and the device an episode trains on, checked on this CPU-only machine."""

import pytest
import torch

from tl.compare import CompareConfig, cells
from tl.config import load_config
from tl.errors import ConfigError
from tl.runtime import DEFAULT_GPU_SHARE, episode_device, gpu_share


def test_a_gpu_share_only_where_the_cluster_has_gpus():
    assert gpu_share(None, 0.0) == 0.0, "a CPU-only cluster: no trial asks for a GPU (it would never start)"
    assert gpu_share(None, 2.0) == DEFAULT_GPU_SHARE == 0.25
    assert gpu_share(0.5, 1.0) == 0.5 and gpu_share(0.0, 4.0) == 0.0
    with pytest.raises(ConfigError, match="'gpu_per_trial' is 0.5 but the Ray cluster has no GPU"):
        gpu_share(0.5, 0.0)
    with pytest.raises(ConfigError, match="not a GPU fraction"):
        gpu_share(-0.1, 1.0)


def test_trained_cells_take_the_gpu_share_feature_cells_none_and_identity_is_unchanged():
    cfg = load_config(CompareConfig, base={"targets": ["optdigits"], "shots": [1], "strategies": [
        {"strategy": "prototype"}, {"strategy": "finetune", "params": {"frozen": 3}}]})
    cpu, gpu = cells(cfg, 0.0), cells(cfg, 0.25)
    assert [c.gpu for c in cpu] == [0.0, 0.0]
    assert {c.spec["label"]: c.gpu for c in gpu} == {"prototype": 0.0, "finetune_k3": 0.25}
    assert [c.name for c in cpu] == [c.name for c in gpu], "where a cell ran does not change what it is"


def test_an_episode_trains_on_the_cpu_here_and_its_tensors_follow_the_task_device():
    from tl.models import make_backbone
    from tl.strategies import EpisodeTask, make_strategy

    assert episode_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    task = EpisodeTask(n_way=2, support_y=torch.tensor([0, 1]).numpy(), seed=0,
                       support_x=torch.rand(2, 3, 28, 28), query_x=torch.rand(3, 3, 28, 28),
                       backbone=lambda: make_backbone("digits_cnn", None), device=episode_device())
    run = make_strategy("finetune", {"frozen": 2, "steps": 2}).start_episode(task)
    run.advance(2)
    assert run.device.type == episode_device()
    assert all(p.device.type == episode_device() for p in run.model.parameters())
    assert run.predict().shape == (3,)


def test_threads_are_what_ray_assigned_a_task_counted_in_cores_of_the_local_ray(ray_local, monkeypatch):
    """A task, actor or trial runs one torch thread per core of what Ray assigned it, read where it
    runs; the local Ray the tests start has 2 logical CPUs per core here (conftest says so to its workers)."""
    import os

    import ray

    from tl.runtime import CPUS_PER_CORE_VAR, assigned_cpus, assigned_threads, threads_for

    factor = float(os.environ[CPUS_PER_CORE_VAR])
    assert factor == max(1.0, 4 / (os.cpu_count() or 1))

    @ray.remote
    def inside():
        import torch

        return assigned_cpus(), assigned_threads(), torch.get_num_threads()

    for cpus in (0.25, 1, 2, 4):
        got = ray.get(inside.options(num_cpus=cpus).remote())
        assert got[0] == cpus and got[1] == got[2] == threads_for(cpus), (cpus, got)
    assert ray.get(inside.options(num_cpus=4).remote())[1] == max(1, round(4 / factor))
    assert assigned_cpus() is None, "the driver has no assignment"
    monkeypatch.setenv(CPUS_PER_CORE_VAR, "1")  # a cluster's node: one thread per assigned CPU
    assert [threads_for(c) for c in (0.25, 1, 1.5, 3)] == [1, 1, 2, 3]


def test_a_one_node_ray_passes_the_storage_check_without_probing(ray_local, tmp_path):
    from tl.runtime import check_shared_storage

    check_shared_storage(tmp_path / "home")  # one node: nothing to probe, nothing written
    assert list(tmp_path.iterdir()) == []
