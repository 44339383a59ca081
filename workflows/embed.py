"""Extract embeddings with Ray Data into the content-addressed cache (or find them there).

    python -m workflows.embed --set dataset=mnistm --set stage=3
    python -m workflows.embed --set folder=/data/my_images --set weights=random
"""

from __future__ import annotations

from dataclasses import dataclass

from workflows import _cli


@dataclass(frozen=True)
class EmbedJob:
    dataset: str | None = None
    folder: str | None = None
    csv: str | None = None
    parquet: str | None = None
    split: str | None = None
    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    stage: int | None = None
    input_size: int | None = None
    batch_size: int = 256
    actors: int = 1
    use_gpu: bool = False


def main() -> int:
    p = _cli.parser("embed", "Extract backbone embeddings with Ray Data into the embedding cache.")
    args = p.parse_args()

    from tl.config import load_config
    from tl.data import load_source
    from tl.embeddings import EmbedConfig, extract
    from tl.pretrain import resolve_weights
    from tl.models import build_backbone
    from tl.runtime import resolve_storage

    base: dict = {"dataset": "optdigits", "split": "test"} if args.smoke_test else {}
    job = load_config(EmbedJob, args.config, args.overrides, base=base)
    if not any((job.dataset, job.folder, job.csv, job.parquet)):
        job = load_config(EmbedJob, args.config, args.overrides, base={**base, "dataset": "mnistm"})
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    size = build_backbone(job.backbone, job.input_size).preprocessing.size
    data = load_source(job.dataset, job.folder, job.csv, job.parquet, size=size)
    if job.split:
        data = data.split(job.split)
    weights = resolve_weights(job.weights, job.backbone, storage, print)
    emb = extract(data, EmbedConfig(backbone=job.backbone, weights=weights, stage=job.stage,
                                    input_size=job.input_size, batch_size=job.batch_size, actors=job.actors,
                                    use_gpu=job.use_gpu), str(storage / "cache"))
    print(f"embeddings ({len(emb.ids)} x {emb.vectors.shape[1]}, {'cache hit' if emb.hit else 'extracted'}): {emb.path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
