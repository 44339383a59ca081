"""Extract embeddings with Ray Data into the content-addressed cache (or find them there).

    python -m workflows.embed --set data=mnistm --set split=test --set stage=3
    python -m workflows.embed --set data=/data/my_images --set weights=random
    python -m workflows.embed --set data=s3://bucket/pets.csv --set backbone=resnet18 --set weights=torchvision:DEFAULT
"""

from __future__ import annotations

from dataclasses import dataclass

from tl.data.spec import DataSpec
from workflows import _cli


@dataclass(frozen=True)
class EmbedJob:
    """``data``: a data spec (an embedded name, or a folder, CSV or Parquet, local or at a URI; a
    folder without class subfolders is unlabelled); ``split``: one split of it (every image when
    unset); ``actors``: extraction tasks at a time on CPUs, the actor pool's size for a large set (GPU
    actors with ``use_gpu``; 0: as many as Ray Data fits on the cluster's CPUs), each with
    ``threads_per_actor`` torch threads (0: one per CPU Ray assigned it)."""

    data: str | DataSpec = "mnistm"
    split: str | None = None
    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    stage: int | None = None
    input_size: int | None = None
    batch_size: int = 256
    actors: int = 1
    threads_per_actor: int = 0
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.actors < 0 or self.threads_per_actor < 0:
            from tl.errors import ConfigError

            raise ConfigError("config keys 'actors' and 'threads_per_actor' must be 0 or more")


def main() -> int:
    p = _cli.parser("embed", "Extract backbone embeddings with Ray Data into the embedding cache.")
    args = p.parse_args()

    from tl.config import load_config
    from tl.data.spec import load_data, part, resolve
    from tl.embeddings import EmbedConfig, extract
    from tl.pretrain import resolve_weights
    from tl.models import input_size_of
    from tl.runtime import resolve_storage

    base: dict = {"data": "optdigits", "split": "test"} if args.smoke_test else {}
    job = load_config(EmbedJob, args.config, args.overrides, base=base)
    name, spec = resolve(job.data, "data")
    if args.check:
        return _cli.checked(job)
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    size = input_size_of(job.backbone, job.input_size)
    weights = resolve_weights(job.weights, job.backbone, storage, print)
    ecfg = EmbedConfig(backbone=job.backbone, weights=weights, stage=job.stage, input_size=job.input_size,
                       batch_size=job.batch_size, actors=job.actors or None, threads_per_actor=job.threads_per_actor,
                       use_gpu=job.use_gpu)
    # a user's images stay in their files (a folder, a manifest, Parquet rows) and stream from storage
    # to the cache through Ray Data: the driver lists them, never decodes them, nor loads the vectors
    data = load_data(name, spec, size, "none", unlabelled=True, lazy=spec is not None)
    if job.split:
        data = part(data, job.split, spec, "data")
    emb = extract(data, ecfg, storage / "cache", load=spec is None)
    print(f"embeddings ({len(data)} x {emb.info['dim']}, {'cache hit' if emb.hit else 'extracted'}): {emb.path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
