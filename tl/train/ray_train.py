"""Launching the training loop on Ray Train (Train V2): DDP over N workers, checkpoints, resume.

Resuming is running again with the same ``RunConfig(name, storage_path)``. Every worker function of
tl follows one protocol: ``start`` (threads, seed, ranks), ``resume`` (the latest checkpoint loaded,
its position said once), a finished run hands its last checkpoint back (``report``), and each
interval ends in ``checkpoint``, which prints its progress line only after the report returns.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any, Callable

import torch

from tl.errors import TrainingError
from tl.runtime import assigned_threads, check_shared_storage, cpus_per_worker, data_progress
from tl.storage import Location

STATE_FILE = "state.pt"


def fit(
    train_fn: Callable[[dict], None],
    train_config: dict[str, Any],
    datasets: dict[str, Any],
    *,
    name: str,
    storage: "str | os.PathLike | Location",
    workers: int,
    use_gpu: bool = False,
    split: tuple[str, ...] = ("train",),
    max_failures: int = 0,
    keep_checkpoints: int = 2,
):
    """Run ``train_fn`` on ``workers`` Ray Train workers; returns the ``ray.train.Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    check_shared_storage(storage)  # before any worker: every node must see the run's checkpoints
    resources = {"CPU": cpus_per_worker(workers)}
    if use_gpu:
        resources["GPU"] = 1
    # Train gives every dataset the driver's default ingest options (unordered): one made ``ordered``
    # (``preprocessed_dataset``) keeps its order in the passes Train runs and in the split over workers
    ingest = {key: ds.context.execution_options for key, ds in datasets.items()
              if ds.context.execution_options.preserve_order}
    # one worker reads every row of every set: no split, so no split coordinator (an actor, a process
    # start, for each split set of each run) stands between the worker and its rows
    split = tuple(split) if workers > 1 else ()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=train_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            **Location.of(storage).ray_storage(),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(split), execution_options=ingest or None),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training run '{name}' failed: {_root_message(exc)}") from exc
    _mark_finished(result, Location.of(storage) / name)
    return result


def _root_message(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "TrainingError:" in line or "TLError" in line:
            return line.split("Error:", 1)[-1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else repr(exc)


def start(seed: int) -> tuple[int, int, int]:
    """Inside a worker: torch's threads from the CPUs Ray assigned this worker (``tl.runtime.assigned_threads``:
    the node's truth, not the driver's cores), the seed set, Ray Data's progress bars off (no terminal);
    returns (world rank, world size, threads)."""
    import ray.train

    threads = assigned_threads()
    torch.manual_seed(seed)
    data_progress()
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), threads


def resume(model: torch.nn.Module, what: str, counter: str) -> tuple[dict | None, int, list[int]]:
    """Inside a worker: the latest checkpoint's state loaded into ``model``, its position (the
    state's ``counter``: ``step`` or ``epoch``) and the positions of every resume so far, this one
    included (kept as the state's ``resumes``: a caller saves the list in each checkpoint it writes);
    (None, 0, []) on a fresh start. ``what`` starts the line rank 0 prints: its pid and where it
    starts or resumes (which a fault test uses to find the worker to kill)."""
    import ray.train

    state = restore_state()
    position = 0
    rank = ray.train.get_context().get_world_rank()
    if state is not None:
        model.load_state_dict(state["model"])
        position = int(state[counter])
    if rank == 0:
        how = "resumes from its checkpoint" if state is not None else "starts"
        print(f"{what} worker rank 0 pid {os.getpid()} {how} at {counter} {position}", flush=True)
    return state, position, ([] if state is None else [*state.get("resumes", []), position])


def resumed_at(state: dict) -> list[int]:
    """The positions a run's final checkpoint state says it resumed at (``resume``'s list)."""
    return [int(p) for p in state.get("resumes", [])]


def restore_state() -> dict | None:
    """Inside a worker: the state saved by the latest checkpoint of this run, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def report(metrics: dict[str, Any], state: dict | None = None) -> None:
    """Inside a worker: report metrics; with ``state``, rank 0 also writes a checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if state is not None and rank == 0:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics, checkpoint=None)


def checkpoint(metrics: dict[str, Any], state: dict, line: str) -> None:
    """Inside a worker: report ``metrics`` with a checkpoint of ``state``, then rank 0 prints ``line`` (if any).
    Printed after the report returns: Ray Train's result queue holds one report, so the previous
    checkpoint is registered by then and a crash after the line redoes at most one interval."""
    import ray.train

    report(metrics, state)
    if line and ray.train.get_context().get_world_rank() == 0:
        print(line, flush=True)


def global_mean(value: float) -> float:
    """The mean of ``value`` over the DDP workers (``value`` itself outside a process group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def load_result_state(result) -> dict:
    """The state dict saved in a finished run's latest checkpoint."""
    if result.checkpoint is None:
        raise TrainingError("the training run finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


#: written in a run's folder once ``fit`` returned: the checkpoint its train function ended on
FINISHED_FILE = "tl_finished.json"


def _mark_finished(result, run_dir: Location) -> None:
    """Record in the run's folder that ``fit`` returned, and on which checkpoint (a folder of the run's
    own), so the same run asked again is handed that checkpoint's state by ``finished_state`` without a
    Ray Train start (a controller and a worker group, each a new process: most of a small run's time)."""
    if result.checkpoint is not None:
        (run_dir / FINISHED_FILE).write_text(
            json.dumps({"checkpoint": os.path.basename(result.checkpoint.path.rstrip("/"))}))


def finished_state(storage: "str | os.PathLike | Location", name: str) -> dict | None:
    """The state of run ``name``'s last checkpoint if ``fit`` finished it before (``_mark_finished``), else
    None: an unfinished run (killed, failed) is resumed by ``fit`` as before."""
    run_dir = Location.of(storage) / name
    marker = run_dir / FINISHED_FILE
    if not marker.is_file():
        return None
    state_file = run_dir / json.loads(marker.read_text())["checkpoint"] / STATE_FILE
    if not state_file.is_file():
        return None
    return torch.load(io.BytesIO(state_file.read_bytes()), map_location="cpu", weights_only=True)


def check_finite(loss: torch.Tensor, *, what: str, step: int, lr: float) -> None:
    """A NaN or infinite loss stops the run with one message naming the strategy, step and rate."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"non-finite loss ({value}) in '{what}' at step {step} with learning rate {lr:g}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def preprocessed_dataset(data, preprocessing, ordered: bool = False):
    """Ray Data pipeline: an ImageSet -> (image, label), preprocessed for the backbone by Ray Data,
    ready to be sharded over the training workers. A set held as files (``ImageSet.lazy``) streams:
    each pass reads, decodes (uint8) and preprocesses its files block by block, and no copy of the
    whole set is made anywhere. A set already in the driver's memory (the embedded suite) is
    materialised once in the object store, so its passes do not preprocess it again.

    ``ordered``: every pass yields the rows in the set's order (Ray Data's ``preserve_order``), in
    its materialisation, in each pass of ``fit`` and in the split over the workers; by default Ray
    Data hands blocks on as their tasks finish, so the order (and the shards, and a local shuffle
    fed from them) changes from run to run."""
    import copy

    import numpy as np

    def preprocess(batch: dict) -> dict:
        images = np.ascontiguousarray(batch["image"])
        # Ray Data hands out read-only views of its blocks (torch warns on one): uint8 images get their
        # float copy anyway, float ones are copied only when read-only
        if images.dtype == np.uint8:
            x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
        else:
            x = torch.from_numpy(images.astype(np.float32, copy=not images.flags.writeable))
        with torch.no_grad():
            x = preprocessing(x)
        return {"image": x.numpy(), "label": batch["label"]}

    ds = data.to_ray(("image", "label")).map_batches(preprocess, batch_format="numpy", batch_size=256)
    if ordered:  # this dataset's own options: the driver's DataContext is left as it is
        options = copy.deepcopy(ds.context.execution_options)
        options.preserve_order = True
        ds.context.execution_options = options
    return ds if data.lazy else ds.materialize()


def epoch_seeds(seed: int, rank: int, epoch: int) -> tuple[int, int]:
    """Two seeds for a worker's epoch (torch's global generator: dropout; and the augmentation's),
    a function of (seed, rank, epoch) alone, so an epoch draws the same numbers whether the run
    went through or resumed at it from a checkpoint."""
    import numpy as np

    a, b = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, dtype=np.uint64)
    return int(a), int(b)


def repeated(ds, times: int):
    """``ds`` followed by itself ``times - 1`` more times (``Dataset.union``): a stream that restarts
    about as rarely as a longer one, made from references to the same blocks or the same files,
    with no copy of the images."""
    return ds.union(*[ds] * (times - 1)) if times > 1 else ds


def shard_accuracy(model: torch.nn.Module, shard, device) -> float:
    """Inside a worker: accuracy of ``model`` over a whole (unsplit) evaluation shard."""
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=512):
            pred = model(batch["image"].to(device)).argmax(1).cpu()
            correct += int((pred == batch["label"]).sum())
            seen += len(pred)
    return correct / max(1, seen)
