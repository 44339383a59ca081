"""The fixed-hyper-parameter table: a preset of the comparison (``workflows.compare``) with every
frozen depth of fine-tuning as its own row, no search, and 100 test episodes per cell.

    python -m workflows.fewshot --set episodes=100 --set shots=[1,5,10]
"""

from __future__ import annotations

from workflows import compare

PRESET = {
    "experiment": "fewshot", "episodes": 100,
    "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"}, {"strategy": "linear_probe"},
                   *({"strategy": "finetune", "params": {"frozen": k}} for k in range(5)),
                   {"strategy": "lp_ft"}, {"strategy": "scratch"}],
}
SMOKE = {"experiment": "fewshot-smoke", "episodes": 3, "shots": [1, 5], "targets": ["optdigits"],
         "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                        {"strategy": "finetune", "params": {"frozen": 2, "steps": 10}}]}


def main() -> int:
    return compare.main("fewshot", "Few-shot episodes: every strategy on the same seeded episodes, with 95% CIs "
                        "(a preset of workflows.compare: fixed hyper-parameters, no search).", PRESET, SMOKE)


if __name__ == "__main__":
    from workflows import _cli

    _cli.run(main)
