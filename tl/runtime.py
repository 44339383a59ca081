"""Where work runs and what produced it: storage paths, CPU fitting on the running Ray, provenance."""

from __future__ import annotations

import math
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


#: set by the process that starts a local Ray with more logical CPUs than cores (``workflows._cli``,
#: the tests' fixture), inherited by that Ray's workers: how many of its logical CPUs make one core
CPUS_PER_CORE_VAR = "TL_CPUS_PER_CORE"


def cpus_per_core() -> float:
    """Logical CPUs of the running Ray per core of its machine: 1 on a cluster (``ray start`` counts
    cores), ``CPUS_PER_CORE_VAR`` on the local Ray tl starts (docs/architecture.md, "Ray in this project")."""
    try:
        return max(1.0, float(os.environ.get(CPUS_PER_CORE_VAR) or 1))
    except ValueError:
        return 1.0


def threads_for(cpus: float) -> int:
    """torch threads for work that Ray assigned ``cpus`` logical CPUs: one per assigned core, at least one."""
    return max(1, math.ceil(cpus / cpus_per_core() - 1e-9))


def assigned_cpus() -> float | None:
    """The CPUs Ray assigned to this process's task, actor, trial or Train worker (None in a driver,
    or outside Ray): the node-side truth, not the driver's ``os.cpu_count()``."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except AssertionError:  # a driver: Ray answers only in a worker
        return None


def assigned_threads() -> int:
    """Sets and returns this process's torch threads from what Ray assigned it (``threads_for``);
    in a driver, the machine's cores."""
    import torch

    cpus = assigned_cpus()
    n = threads_for(cpus) if cpus else max(1, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def cpus_per_worker(num_workers: int, reserve: float = 0.5) -> float:
    """CPUs each of ``num_workers`` Ray Train workers asks for so the group fits the running Ray's
    logical CPUs and leaves ``reserve`` for the Ray Data tasks around it (docs/architecture.md, "Ray
    in this project": starvation hangs): at most one, and the worker runs as many torch threads as
    that is of a core (``threads_for``): more cores for a run are more workers."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - reserve) / max(1, num_workers)
    if share <= 0:
        raise ConfigError(f"{num_workers} workers do not fit the {total:g} CPUs of the running Ray")
    return round(min(1.0, share), 3)


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


_REACHED: set[tuple[str, frozenset]] = set()


def check_shared_storage(storage: "str | os.PathLike | Location", what: str = "storage path") -> None:
    """On a Ray cluster of several nodes, a local ``storage`` folder is used by trials and Train
    workers on every node (cells, checkpoints, caches, weights): refuse it at once, naming it, when a
    node does not see it (its own disk), rather than let cells written there come back "unfinished".
    Checked for real: the driver writes a marker there and a zero-CPU task pinned to each other node
    reads it. A URI (s3://...) and a one-node Ray pass as they are; a folder that passed on the same
    nodes, or lies inside one that did, is not probed again."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    loc = Location.of(storage)
    if not loc.is_local or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in nodes if n["NodeID"] != here]
    ids = frozenset(n["NodeID"] for n in nodes)
    if not others or any(same == ids and Path(loc.path).is_relative_to(done) for done, same in _REACHED):
        return  # a folder inside one every node saw (a run's checkpoints under its storage) is seen too
    token = uuid.uuid4().hex
    marker = Path(loc.path) / f".tl-reach-{token[:12]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token) for n in others]
        try:
            seen = ray.get(refs, timeout=120)
        except ray.exceptions.GetTimeoutError as exc:
            raise ConfigError(f"{what} '{loc.path}': the check that every node of the cluster sees it got no answer "
                              f"from some of its {len(others)} other nodes within 120 s") from exc
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{n.get('NodeManagerAddress', '?')} node {n['NodeID'][:8]}" for n, ok in zip(others, seen) if not ok]
    if blind:
        raise ConfigError(
            f"{what} '{loc.path}' is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
            f"({', '.join(blind[:4])}) cannot see it, and trials there would write cells and look for weights "
            f"where this driver cannot; on a cluster of several nodes pass --storage a folder every node mounts "
            f"at the same path (NFS, a shared volume) or a bucket (s3://bucket/tl)")
    _REACHED.add((str(loc.path), ids))


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


COMMIT_VAR = "TL_GIT_COMMIT"  # set by workflows.submit: a job's upload has no .git


def data_progress(context: Any = None) -> None:
    """Ray Data's progress bars (rows done) on ``context`` (a dataset's; this process's by default)
    only where stderr is a terminal. In a log file each redraw would be a line (inside a Tune trial
    or a Ray Train worker, never a terminal: about 500 of the 1,000 lines one short adaptation run
    printed), and a long extraction would print a block of resource lines every 10 s."""
    import sys

    import ray.data

    (context or ray.data.DataContext.get_current()).enable_progress_bars = sys.stderr.isatty()


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
