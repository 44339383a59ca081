"""Unsupervised domain adaptation on Ray Train: source-only and DANN, CDAN, MMD, CORAL on
mnist -> mnistm and mnist -> optdigits over seeds, with three model-selection rules.

    python -m workflows.adapt --storage /tmp/tl
    python -m workflows.adapt --set targets=[mnistm] --set seeds=[0] --set params.steps=1000
"""

from __future__ import annotations


from workflows import _cli


def main() -> int:
    p = _cli.parser("adapt", "Unsupervised domain adaptation (source_only, adabn, dann, cdan, mmd, coral, mcc) on Ray Train.")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers per run (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = p.parse_args()

    from tl.adapt_bench import AdaptExperimentConfig, run_experiment
    from tl.config import load_config
    from tl.runtime import resolve_storage
    from tl.storage import Location

    base: dict = {}
    if args.smoke_test:
        base = {"experiment": "adapt-smoke", "targets": ["optdigits"], "seeds": [0], "limit": 128,
                "checkpoint_every": 2, "methods": [{"strategy": "source_only"}, {"strategy": "dann"}],
                "params": {"steps": 4, "batch_size": 32, "target_batch_size": 32}}
    if args.workers is not None:
        base["workers"] = args.workers
    if args.gpu:
        base["use_gpu"] = True
    cfg = load_config(AdaptExperimentConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    output = args.output or f"results/{cfg.experiment}"
    _cli.init_ray(args.address)
    with _cli.output_folder(output) as folder:
        out = run_experiment(cfg, storage, folder)
        (folder / "command.txt").write_text("python -m workflows.adapt " + " ".join(_cli.shlex_args()) + "\n")
    where = Location.of(output)
    print(f"runs: {where / 'runs.csv'}\nsummary: {where / 'summary.md'}")
    return out.exit_status


if __name__ == "__main__":
    _cli.run(main)
