"""Recommend a backbone, a stage (frozen depth) and a family before training: transferability scores
on the frozen embeddings of the target's labelled shots, ranked, with "can't tell" when resampling the
shots does not separate the best two.

    python -m workflows.recommend
    python -m workflows.recommend --set target=optdigits --set shots=1
    python -m workflows.recommend --set target=/data/my_images --set shots=5
    python -m workflows.recommend --config my-candidates.yaml   # candidates: [{backbone, weights}, ...]
"""

from __future__ import annotations

from workflows import _cli


def main() -> int:
    p = _cli.parser("recommend", "Rank backbones and stages for a target by transferability scores.")
    args = p.parse_args()

    from tl.config import load_config
    from tl.recommend import RecommendConfig, recommend, write_outputs
    from tl.runtime import resolve_storage

    base: dict = {"target": "optdigits", "shots": 2, "bootstrap": 20} if args.smoke_test else {}
    cfg = load_config(RecommendConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)  # pretrained weights are made on Ray Train when missing; a user's images read with Ray Data
    result = recommend(cfg, storage)
    output = args.output or f"results/{cfg.experiment}"
    with _cli.output_folder(output) as folder:
        write_outputs(result, folder)
    print(f"recommendation in {output}/recommend.md and recommend.yaml")
    return 0


if __name__ == "__main__":
    _cli.run(main)
