"""Where work runs and what produced it: storage paths, CPU fitting on the running Ray, provenance."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from tl.errors import ConfigError
from tl.storage import Location, check_writable

DEFAULT_STORAGE = "~/.cache/tl"
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_storage(path: "str | os.PathLike | Location | None") -> Location:
    """The tl home (checkpoints, caches, Ray storage): a local folder outside the repository or a URI
    any pyarrow filesystem reaches (``s3://bucket/tl``); checked writable now, naming the path or URI,
    so a missing bucket, missing credentials or an endpoint nobody answers on fail before any trial."""
    loc = Location.of(path or DEFAULT_STORAGE)
    if loc.is_local:
        p = Path(loc.path).resolve()
        try:
            p.relative_to(REPO_ROOT)
            inside = (REPO_ROOT / ".git").exists()
        except ValueError:
            inside = False
        if inside:
            raise ConfigError(f"storage path '{p}' is inside the repository; use a path outside it (default {DEFAULT_STORAGE})")
        loc = Location.of(p)
    return check_writable(loc, "storage path")


def cpus_per_worker(num_workers: int, reserve: float = 0.5) -> float:
    """CPUs each of ``num_workers`` may ask for so the group fits the running Ray's logical CPUs
    and leaves ``reserve`` for the Ray Data tasks around it (docs/architecture.md, "Ray in this project": starvation hangs)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - reserve) / max(1, num_workers)
    if share <= 0:
        raise ConfigError(f"{num_workers} workers do not fit the {total:g} CPUs of the running Ray")
    return round(min(1.0, share), 3)


DEFAULT_GPU_SHARE = 0.25  # four trained cells share one GPU: a few-shot episode is far from filling it


def cluster_gpus() -> float:
    """GPUs of the running Ray cluster (0 without one, or before ``ray.init``)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def gpu_share(requested: float | None, gpus: float, key: str = "gpu_per_trial") -> float:
    """The GPU fraction a trained cell asks for: ``requested`` when set, otherwise
    ``DEFAULT_GPU_SHARE`` where the cluster has GPUs and 0 on a CPU-only one (nothing changes there)."""
    if requested is None:
        return DEFAULT_GPU_SHARE if gpus > 0 else 0.0
    if requested < 0 or requested > max(1.0, gpus):
        raise ConfigError(f"config key '{key}': {requested} is not a GPU fraction between 0 and 1")
    if requested > 0 and gpus == 0:
        raise ConfigError(f"config key '{key}' is {requested} but the Ray cluster has no GPU; leave it unset")
    return float(requested)


def episode_device() -> str:
    """Where a trial trains its episodes: the GPU Ray assigned to it (Ray sets CUDA_VISIBLE_DEVICES
    for a trial that asked for a GPU fraction and hides every GPU from one that did not), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_threads(num_workers: int) -> int:
    """Threads for each torch worker process on one machine: the cores, shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


COMMIT_VAR = "TL_GIT_COMMIT"  # set by workflows.submit: a job's upload has no .git


def data_progress(context: Any = None) -> None:
    """Ray Data's progress bars (rows done) on ``context`` (a dataset's; this process's by default)
    only where stderr is a terminal. In a log file each redraw would be a line (inside a Tune trial
    or a Ray Train worker, never a terminal: about 500 of the 1,000 lines one short adaptation run
    printed), and a long extraction would print a block of resource lines every 10 s."""
    import sys

    import ray.data

    (context or ray.data.DataContext.get_current()).enable_progress_bars = sys.stderr.isatty()


#: seconds between Ray Data's refreshes of an execution's resource limits (Ray Data 2.60: 1 s)
DATA_LIMITS_REFRESH_S = 0.1


def data_limits_refresh(seconds: float = DATA_LIMITS_REFRESH_S) -> None:
    """Ray Data (2.60) refreshes an execution's resource limits once a second, and until its
    autoscaling coordinator's answer to the first request is seen they are zero: the execution runs
    a single task (its liveness rule). Refreshed every ``seconds`` instead, the second task starts
    when the answer comes, about 0.6 s sooner per execution: 10,000 files on warm worker processes
    in 5.2-5.4 s instead of 5.9-6.0 s on 2 cores (``python -m benchmarks.files``, docs/data.md).
    Each refresh is a look at one pending reference (a new request to the coordinator actor when the
    last has come back), in this process only. A Ray without the setting is left as it is
    (tests/test_embeddings.py checks that the pinned one has it)."""
    from ray.data._internal.execution import resource_manager

    manager = getattr(resource_manager, "ResourceManager", None)
    if isinstance(getattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None), (int, float)):
        manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = seconds


def git_head(cwd: str | os.PathLike, dirty_mark: bool = False) -> str:
    """The HEAD commit of the checkout at ``cwd`` ("" outside one); ``dirty_mark``: append ``+dirty``
    when tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        if head and dirty_mark and git("status", "--porcelain", "--untracked-files=no"):
            head += "+dirty"
        return head
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit this code is: the repository's HEAD, or in a submitted job the one the submitter had."""
    return os.environ.get(COMMIT_VAR) or git_head(REPO_ROOT) or "unknown"


def versions() -> dict[str, str]:
    import numpy
    import ray
    import torch
    import torchvision

    import tl

    return {
        "tl": tl.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "ray": ray.__version__, "numpy": numpy.__version__,
    }


def hardware() -> dict[str, object]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "gpu": gpu, "host": platform.node()}


def provenance() -> dict[str, object]:
    return {"git_commit": git_commit(), "versions": versions(), "hardware": hardware()}
