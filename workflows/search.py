"""Ray Tune search over frozen depth x learning rates on validation episodes, then a test evaluation.

    python -m workflows.search --set target=mnistm --set shots=5
    python -m workflows.search --config my_space.yaml --set scheduler=none
"""

from __future__ import annotations


from workflows import _cli


def main() -> int:
    p = _cli.parser("search", "Search a strategy's hyper-parameters with Ray Tune (ASHA over training steps).")
    args = p.parse_args()

    from tl.config import load_config
    from tl.runtime import resolve_storage
    from tl.storage import Location
    from tl.search import SearchConfig, run_search

    base: dict = {}
    if args.smoke_test:
        base = {"experiment": "search-smoke", "target": "optdigits", "shots": 1, "val_episodes": 2, "test_episodes": 3,
                "max_steps": 9, "space": {"frozen": {"grid": [3, 4]}, "lr": {"grid": [0.01, 0.1]}}}
    cfg = load_config(SearchConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    output = args.output or f"results/{cfg.experiment}"
    _cli.init_ray(args.address)
    with _cli.output_folder(output) as folder:
        out = run_search(cfg, storage, folder)
        (folder / "command.txt").write_text("python -m workflows.search " + " ".join(_cli.shlex_args()) + "\n")
    where = Location.of(output)
    print(f"trials: {where / 'trials.csv'}\nbest: {where / 'best.yaml'}\nsummary: {where / 'summary.md'}")
    return 0 if out else 1


if __name__ == "__main__":
    _cli.run(main)
