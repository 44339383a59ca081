"""The recommendation per (target, shots), made on validation episodes and confirmed on test ones
(docs/architecture.md, "Evaluation protocol"; docs/comparison.md, "What a tie means").

Choosing the winner on the test episodes it is then reported on overstates it (the winner's
curse: the maximum of noisy means is biased upwards). So every cell also scores its strategy on
validation episodes of the ``adapt`` split (no image shared with the test episodes; the same
validation episodes for every strategy, so differences are paired; a searched entry chose its
candidate on other episodes, so its validation figure is not a maximum). The validation winner is
the strategy with the highest validation mean. A strategy is *tied* with it when they are
practically equivalent: the paired 95% interval of their validation difference lies within
± ``margin`` (one point by default; an equivalence test, Schuirmann 1987's two one-sided tests at
2.5% each). Among the tied strategies the recommendation is the cheapest by a deterministic cost
(``Strategy.episode_cost``: the training an episode does, which is also what exporting it costs
once), never by timed seconds, which for feature strategies are timer noise. A tie that is not
shown (too few validation episodes for the interval to fit in the margin) is no tie: the winner is
recommended. The test episodes then say how the recommendation does, unbiased, against the
strategy that happened to be best on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tl.stats import Paired, paired

#: practical equivalence on validation: a strategy ties with the validation winner when the paired 95%
#: interval of their difference lies within this many accuracy points (as a fraction) either side of 0
TIE_MARGIN = 0.01


@dataclass
class Choice:
    """The recommendation of one (target, shots); ``val``/``test``/``cost``: per strategy."""

    target: str
    shots: int
    recommended: str
    val_winner: str | None
    tied: list[str]
    reason: str
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)  # deterministic relative cost of an episode
    test_best: str = ""
    confirm: Paired | None = None  # test: recommended - test_best, paired over the test episodes
    vs_winner: Paired | None = None  # test: recommended - val_winner (a tie the test episodes disagree with)

    @property
    def test_disagrees(self) -> bool:
        """The test episodes put the recommendation clearly below the validation winner it was tied
        with (the choice stands; it is said)."""
        return (self.val_winner is not None and self.recommended != self.val_winner and self.vs_winner is not None
                and not self.vs_winner.tie and self.vs_winner.mean < 0)


def validation_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, shots, strategy, seed, validation episode) from the cells' rows."""
    if "val_episodes" not in rows:
        return pd.DataFrame(columns=["target", "shots", "strategy", "seed", "episode", "accuracy"])
    first = rows.drop_duplicates(["target", "shots", "strategy", "seed"])
    out = [{"target": r.target, "shots": int(r.shots), "strategy": r.strategy, "seed": int(r.seed),
            "episode": int(i), "accuracy": float(a)}
           for r in first.itertuples() for i, a in json.loads(r.val_episodes or "[]")]
    return pd.DataFrame(out, columns=["target", "shots", "strategy", "seed", "episode", "accuracy"])


def _aligned(g: pd.DataFrame, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Accuracies of ``a`` and ``b`` on the episodes both ran, in the same order."""
    pa = g[g["strategy"] == a].set_index(["seed", "episode"])["accuracy"]
    pb = g[g["strategy"] == b].set_index(["seed", "episode"])["accuracy"]
    both = pa.index.intersection(pb.index).sort_values()
    return pa.loc[both].to_numpy(), pb.loc[both].to_numpy()


def paired_on(g: pd.DataFrame, a: str, b: str) -> Paired:
    """The paired difference ``a - b`` over the episodes of ``g`` (one target and shot count)."""
    return paired(*_aligned(g, a, b))


def episode_costs(rows: pd.DataFrame) -> dict[str, float]:
    """Per strategy, the deterministic relative cost of one episode (the rows' ``cost`` column); rows
    made before it existed fall back to measured seconds per episode."""
    col = "cost" if "cost" in rows and rows["cost"].notna().all() else "seconds"
    return rows.groupby("strategy")[col].mean().to_dict()


def choose(rows: pd.DataFrame, margin: float = TIE_MARGIN) -> list[Choice]:
    """The recommendation for every (target, shots) of ``rows`` (a comparison's test rows, whose
    ``val_episodes`` column carries each cell's validation accuracies); ``margin``: the practical
    equivalence that makes a tie."""
    val_all = validation_rows(rows)
    out = []
    for (target, shots), test in rows.groupby(["target", "shots"], sort=True):
        test_mean = test.groupby("strategy")["accuracy"].mean().to_dict()
        cost = episode_costs(test)
        test_best = max(sorted(test_mean), key=lambda s: (test_mean[s], -cost[s]))
        val = val_all[(val_all["target"] == target) & (val_all["shots"] == shots)]
        val_mean = val.groupby("strategy")["accuracy"].mean().to_dict()
        if len(test_mean) == 1:
            rec, winner, tied = test_best, (test_best if val_mean else None), [test_best]
            reason = "the only strategy of this table"
        elif not val_mean:
            rec, winner, tied = test_best, None, [test_best]
            reason = ("no validation episodes in these rows (the target has no validation split, or the rows were "
                      "made before every cell was scored on them): chosen on the test episodes, so its accuracy is "
                      "optimistic")
        else:
            winner = max(sorted(val_mean), key=lambda s: (val_mean[s], -cost.get(s, np.inf)))
            tied = [s for s in sorted(val_mean) if s == winner or paired_on(val, s, winner).equivalent(margin)]
            rec = min(tied, key=lambda s: (cost.get(s, np.inf), -val_mean[s], s))
            if rec == winner:
                reason = "best on validation" + (f"; equivalent there (within ±{100 * margin:g} points) to "
                                                 f"{', '.join(sorted(set(tied) - {rec}))}, and the cheapest of them"
                                                 if len(tied) > 1 else "")
            else:
                reason = (f"equivalent on validation to the validation winner {winner} (the paired 95% interval of the "
                          f"difference within ±{100 * margin:g} points), and the cheapest of the {len(tied)} "
                          f"equivalent strategies")
            missing = sorted(set(test_mean) - set(val_mean))
            if missing:
                reason += f"; not scored on validation, so not chosen: {', '.join(missing)}"
        out.append(Choice(str(target), int(shots), rec, winner, sorted(tied, key=lambda s: (-val_mean.get(s, 0), s)),
                          reason, val_mean, test_mean, cost, test_best, paired_on(test, rec, test_best),
                          paired_on(test, rec, winner) if winner else None))
    return out


def winners_curse(choices: list[Choice]) -> dict:
    """How often the validation winner differs from the test winner, and the mean test-accuracy
    gap between them (the test winner's figure is the optimistic one)."""
    pairs = [c for c in choices if c.val_winner is not None]
    differ = [c for c in pairs if c.val_winner != c.test_best]
    gaps = [c.test[c.test_best] - c.test[c.val_winner] for c in pairs]
    return {"cells": len(pairs), "differ": len(differ), "mean_gap": float(np.mean(gaps)) if gaps else float("nan"),
            "max_gap": float(np.max(gaps)) if gaps else float("nan")}
