"""Evaluate strategies on the same seeded few-shot episodes (feature and fine-tuning families).

    python -m workflows.fewshot --set episodes=100 --set shots=[1,5,10]
"""

from __future__ import annotations

from pathlib import Path

from workflows import _cli


def main() -> int:
    p = _cli.parser("fewshot", "Few-shot episodes: every strategy on the same seeded episodes, with 95% CIs.")
    args = p.parse_args()

    from tl.config import load_config
    from tl.fewshot import FewShotConfig, run_fewshot
    from tl.runtime import resolve_storage

    base: dict = {}
    if args.smoke_test:
        base = {"experiment": "fewshot-smoke", "episodes": 3, "shots": [1, 5], "targets": ["optdigits"],
                "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                               {"strategy": "finetune", "params": {"frozen": 2, "steps": 10}}]}
    cfg = load_config(FewShotConfig, args.config, args.overrides, base=base)
    storage = resolve_storage(args.storage)
    output = Path(args.output or f"results/{cfg.experiment}")
    _cli.init_ray(args.address)
    out = run_fewshot(cfg, storage, output)
    (output / "command.txt").write_text("python -m workflows.fewshot " + " ".join(_cli.shlex_args()) + "\n")
    print(f"rows: {output / 'rows.parquet'}\nsummary: {output / 'summary.md'}")
    return 2 if out["failures"] else 0


if __name__ == "__main__":
    _cli.run(main)
