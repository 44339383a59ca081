"""Train the winning strategy on all labelled images of a target and write a self-contained model folder.

    python -m workflows.export --set best=results/compare/best.yaml --set target=mnistm --set shots=5 \\
        --output models/mnistm-5shot
    python -m workflows.export --set strategy=logistic --set target=optdigits --output models/optdigits-logistic
    python -m workflows.export --set strategy=finetune --set params.frozen=2 --set data=/data/my_images \\
        --set test_data=/data/my_test_images --output models/mine
"""

from __future__ import annotations


from workflows import _cli


def main() -> int:
    p = _cli.parser("export", "Train a strategy (the comparison's winner, or one you name) on all labelled "
                              "images and export the model (weights, architecture, preprocessing, classes).")
    args = p.parse_args()

    from tl.config import load_config
    from tl.export import ExportConfig, check_data, export, needs_ray
    from tl.runtime import resolve_storage
    from tl.storage import Location

    base: dict = {}
    if args.smoke_test:
        base = {"strategy": "finetune", "params": {"frozen": 3, "steps": 5}, "target": "optdigits",
                "weights": "random", "train_on": "shots", "shots": 5}
    cfg = load_config(ExportConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg, check_data(cfg))
    storage = resolve_storage(args.storage)
    name = Location.of(cfg.data).name if cfg.data else (cfg.target or "best").replace(":", "-")
    output = args.output or f"models/{name}-{f'{cfg.shots}shot' if cfg.shots else cfg.strategy}"
    if args.address or needs_ray(cfg):
        _cli.init_ray(args.address)
    with _cli.no_empty_folder(output):
        manifest = export(cfg, storage, output)
    ev = manifest["evaluation"]
    print(f"model: {output}\nmanifest: {Location.of(output) / 'model.json'}"
          + (f"\naccuracy: {ev['accuracy']:.4f} on {ev['images']} test images" if ev else ""))
    return 0


if __name__ == "__main__":
    _cli.run(main)
