"""The main job: compare transfer strategies on the same seeded episodes, each cell a Ray Tune trial.

    python -m workflows.compare                       # make demo's grid: every family on mnistm, 1 and 5 shots
    python -m workflows.compare --config workflows/configs/compare-full.yaml   # the full grid (about 18 min, 2 cores)
    python -m workflows.compare --set 'shots=[1,5]' --set episodes=100
    python -m workflows.compare --address ray://head:10001 --storage /shared/tl --output /shared/results/x
"""

from __future__ import annotations

import os

from workflows import _cli

SMOKE = {"experiment": "compare-smoke", "targets": ["optdigits"], "shots": [1, 5], "episodes": 3, "val_episodes": 2,
         "feature_val_episodes": 10,
         "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                        {"strategy": "finetune", "params": {"steps": 10}, "search": {"frozen": [3, 4]}},
                        {"strategy": "bd_cspn", "label": "bd_cspn_bn_target", "params": {"bn_stats": "target"}}]}


def main(prog: str = "compare", description: str = "Compare transfer strategies (feature extraction, "
         "fine-tuning, ...) with honest CIs.", preset: dict | None = None, smoke: dict = SMOKE) -> int:
    p = _cli.parser(prog, description)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (the same as running the same command again)")
    p.add_argument("--retry-failed", action="store_true", help="run cells that failed before again")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of trials and episodes and an estimated wall time; run nothing")
    args = p.parse_args()

    from tl.compare import CompareConfig, dry_run, run_compare
    from tl.config import load_config
    from tl.runtime import resolve_storage
    from tl.storage import Location

    base: dict = dict(preset or {})
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # the local Ray has more logical CPUs than cores; one trained cell per core is faster than
        # two single-threaded cells sharing one (results/bench/compare.md: 168.8 s against 180.8 s)
        base["cpus_per_trial"] = _cli.local_cpus() / (os.cpu_count() or 1)
        # feature cells with the same request reuse the trained cells' warm trial processes (Tune's
        # reuse_actors): 18 fresh quarter-CPU processes at the end took 92 s of a 787 s run here
        base["feature_cpus"] = base["cpus_per_trial"]
    if args.smoke_test:
        base |= smoke
    cfg = load_config(CompareConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg, check_targets(cfg))
    storage = resolve_storage(args.storage)
    output = args.output or f"results/{cfg.experiment}"
    if args.dry_run:
        dry_run(cfg, storage, retry_failed=args.retry_failed)
        return 0
    _cli.init_ray(args.address)
    with _cli.output_folder(output) as folder:
        out = run_compare(cfg, storage, folder, retry_failed=args.retry_failed)
        (folder / "command.txt").write_text(f"python -m workflows.{prog} " + " ".join(_cli.shlex_args()) + "\n")
    where = Location.of(output)
    print(f"rows: {where / 'rows.parquet'}\nsummary: {where / 'summary.md'}\nbest: {where / 'best.yaml'}\n"
          f"plot: {where / 'accuracy_vs_shots.png'}")
    return out.exit_status


def check_targets(cfg) -> list[str]:
    """``--check``'s look at the user's targets, without running anything (no Ray, no image decoded):
    each folder, manifest or Parquet file listed, refused with fewer than two classes, and each class
    checked to have images for the largest shot count and a query, as a run checks them first.
    Returns notes on the data it could not list (not on this machine, in a bucket)."""
    from tl.data.spec import check_listing, check_target, load_target

    notes = []
    for t in cfg.targets:
        spec = cfg.spec(t)
        got = check_listing(t, spec, f"data.{t}")
        if isinstance(got, str):
            notes.append(got)
        elif got is not None:
            check_target(load_target(t, spec, cfg.test_split, cfg.val_split, lazy=True), t, max(cfg.shots))
    return notes


if __name__ == "__main__":
    _cli.run(main)
