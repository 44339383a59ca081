"""The Ray Data actor that runs a backbone over batches of images.

Kept in a module that imports only torch and the backbone registry: every actor imports it on
start, and a lighter import is a faster start (it is part of the extraction's wall time).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class Embedder:
    """Builds the backbone once per actor, then embeds batches of raw (3 x H x W) images."""

    def __init__(self, backbone: str, weights: str | None, stage: int | None, input_size: int | None, threads: int):
        import torch

        from tl.models.registry import make_backbone
        from tl.runtime import assigned_threads

        if threads:
            torch.set_num_threads(threads)
        else:  # what Ray assigned this actor, on its node
            assigned_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = make_backbone(backbone, weights, input_size).eval().to(self.device)
        self.stage = stage

    def __call__(self, batch: dict) -> dict:
        """Every column but ``image`` passes through; ``embedding`` is added. Images are float32 in
        [0, 1] or uint8 in 0..255 (files decoded inside Ray Data), moved to the device as they are."""
        import torch

        with torch.inference_mode():
            images = batch["image"]
            if images.dtype == object:  # a pandas block's column of arrays (files decoded by tl.data.sources)
                images = np.stack(list(images))
            if images.dtype == np.uint8:
                x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).float().div_(255.0)
            else:
                x = torch.from_numpy(np.require(images, np.float32, ["C", "W"])).to(self.device)
            emb = self.model(self.model.preprocessing(x), self.stage).float().cpu().numpy()
        return {**{k: v for k, v in batch.items() if k != "image"}, "embedding": emb}


class FileEmbedder(Embedder):
    """An ``Embedder`` that first reads and decodes its batch's listed images (``decode``: a
    ``tl.data.decode.ReadDecode`` over files, or a ``tl.data.parquet.ReadGroups`` over Parquet row
    groups, which yields its chunks), in the same actor: decoding beside the model in each actor
    keeps a block's pixels in one process from file to embedding. The actor path (GPUs, large
    sets); for a set of up to ``tl.embeddings.TASK_MAX_ROWS`` images on CPUs ``embed_batch`` does
    the same in tasks."""

    def __init__(self, decode, **kwargs):
        super().__init__(**kwargs)
        self.decode = decode

    def __call__(self, batch):  # a generator: Ray Data takes each yielded batch as output
        decoded = self.decode(batch)
        for part in [decoded] if isinstance(decoded, dict) else decoded:
            yield super().__call__(part)


#: backbones built in this worker process, by what builds them (newest last). A Ray Data task's
#: worker process serves the next block and the next extraction too, so a backbone is built (and
#: torch imported) once per process, not once per extraction as an actor pool's fresh processes do
#: (1,000 files: 14-18 s per extraction with an actor pool, 1.5-2.8 s with warm tasks, on 2 busy cores)
_BUILT: "OrderedDict[tuple, Embedder]" = OrderedDict()
_KEEP = 1


def embed_batch(batch, *, backbone: str, weights: str | None, digest: str, stage: int | None,
                input_size: int | None, threads: int, decode=None):
    """Ray Data task function (CPU): the batch embedded by this process's copy of the backbone,
    built on first use and kept for the next blocks (``digest``: the weights' content hash, so a
    changed weights file is built anew). ``decode`` (as in ``FileEmbedder``) first reads and decodes
    the listed images. A generator: Ray Data takes each yielded batch as output."""
    import torch

    from tl.runtime import assigned_threads

    key = (backbone, weights, digest, input_size)
    embedder = _BUILT.pop(key, None) or Embedder(backbone, weights, stage, input_size, 0)
    _BUILT[key] = embedder
    while len(_BUILT) > _KEEP:
        _BUILT.popitem(last=False)
    embedder.stage = stage
    if threads:  # a reused process keeps no earlier task's setting: set for every task
        torch.set_num_threads(threads)
    else:  # what Ray assigned this task, on its node
        assigned_threads()
    if decode is None:
        yield embedder(batch)
        return
    decoded = decode(batch)
    for part in [decoded] if isinstance(decoded, dict) else decoded:
        yield embedder(part)
