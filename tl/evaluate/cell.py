"""The cell function of a comparison (and of a search's test phase), and its typed inputs.

A cell (one target x shots x seed x strategy entry) runs wherever the engine puts it (a Tune trial,
a plain loop): a searched entry first chooses its candidate on the ``selection`` episodes, then the
strategy is scored on the ``validation`` episodes that every strategy of the comparison shares (the
recommendation is made there, ``tl.choice``), then on the test episodes. Validation and selection
episodes are drawn from the target's ``adapt`` split, test episodes from its ``test`` split
(docs/architecture.md, "Evaluation protocol").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tl.data import ImageSet
from tl.data.episodes import query_folds
from tl.errors import ConfigError, TrainingError
from tl.evaluate.episodes import run_episodes
from tl.evaluate.selection import VAL_RULES, Selection, select_on_validation
from tl.strategies import Strategy, StrategyEntry


@dataclass(frozen=True)
class EpisodeSettings:
    """What every cell of a grid shares about its episodes. ``episodes``: test episodes;
    ``val_episodes``: validation episodes of a trained strategy (and selection episodes per
    candidate of a search); ``feature_val_episodes``: validation episodes of a feature strategy
    (milliseconds each, so enough for the tie rule to have power); ``validate``: score on validation
    episodes at all (a search's test phase does not: the search was its validation)."""

    backbone: str
    input_size: int | None
    queries: int
    n_way: int | None
    episodes: int
    val_episodes: int = 4
    feature_val_episodes: int = 100
    val_rule: str = "full"
    validate: bool = True

    def __post_init__(self) -> None:
        if self.val_rule not in VAL_RULES:
            raise ConfigError(f"config key 'val_rule': '{self.val_rule}' is not one of {', '.join(VAL_RULES)}")

    def validation_episodes(self, strategy: Strategy) -> int:
        """How many validation episodes score ``strategy``."""
        return self.feature_val_episodes if strategy.uses_embeddings else self.val_episodes


@dataclass(frozen=True)
class CellInputs:
    """Everything a cell function reads besides its own spec. ``data``: ``{target: {"test": ImageSet,
    "val": ImageSet | None}}``; ``embeddings``: ``{target: {bn_stats: {split: vectors}}}`` for feature
    strategies; ``weights``: the backbone's weights; ``target_weights``: ``{target: weights}`` with the
    target's BatchNorm statistics, for a strategy with ``bn_stats: target``; ``fold_weights``:
    ``{target: {fold: weights}}``, the same statistics estimated without the validation fold
    ``fold`` (``tl.data.episodes.query_folds``), which score that fold's validation episodes (so no
    validation query is ever among the images its statistics came from); for such a feature
    strategy ``embeddings[target]["target"]["val"]`` is ``{fold: vectors}`` likewise."""

    data: dict[str, dict[str, ImageSet | None]]
    settings: EpisodeSettings
    weights: str | None = None
    embeddings: dict = field(default_factory=dict)
    target_weights: dict = field(default_factory=dict)
    fold_weights: dict = field(default_factory=dict)


@dataclass
class Validated:
    """A cell's validation: the candidate chosen (``strategy``), the selection scores of a searched
    entry (``selection``) and the chosen strategy's rows on the validation episodes."""

    strategy: Strategy
    selection: Selection | None
    rows: list[dict]


class _Cell:
    """One cell's strategy candidates, backbones and embeddings, built once for its phases."""

    def __init__(self, spec: dict, inputs: CellInputs):
        from tl.models import make_backbone

        s = self.settings = inputs.settings
        self.inputs, self.target, self.shots, self.label = inputs, spec["target"], spec["shots"], spec["label"]
        self.entry = StrategyEntry(**spec["entry"])
        self.cands = [self.entry.build(p) for p in self.entry.candidates()]
        first = self.first = self.cands[0]
        weights = inputs.weights
        if first.bn_stats_at_start == "target":
            if self.target not in inputs.target_weights:
                raise ConfigError(f"strategy '{self.label}': bn_stats target, but no target-statistics weights were "
                                  f"made for target '{self.target}'")
            weights = inputs.target_weights[self.target]
        self.emb = (inputs.embeddings.get(self.target) or {}).get(first.bn_stats) or {}
        self.backbone = None if first.uses_embeddings else make_backbone(s.backbone, weights, s.input_size)
        self.parts = inputs.data[self.target]
        # the target's unlabelled pool: the validation half (docs/architecture.md, "The embedded suite"),
        # never a test image; handed to every strategy that uses it (Strategy.uses_pool)
        self.pool = self.parts.get("val") if first.uses_pool else None

    def common(self, seed: int) -> dict:
        s = self.settings
        return dict(shots=self.shots, queries=s.queries, seed=seed, n_way=s.n_way, unlabelled=self.pool)

    def validate(self, seed: int) -> Validated | None:
        """Choose a searched entry's candidate on selection episodes, then score the strategy on the
        validation episodes every strategy shares (None: no validation split, or ``validate`` off)."""
        from tl.models import make_backbone

        s, val = self.settings, self.parts.get("val")
        if val is None or not s.validate:
            return None
        # validation and selection episodes take each episode's queries from one fold of the split, and
        # target statistics are those estimated without that fold: no query is among their images
        folds = query_folds(val.labels)
        backbone = self.backbone
        if self.first.bn_stats_at_start == "target":
            if self.target not in self.inputs.fold_weights:
                raise ConfigError(f"strategy '{self.label}': bn_stats target, but no per-fold target-statistics "
                                  f"weights were made for the validation episodes of target '{self.target}'")
            if not self.first.uses_embeddings:
                backbone = {f: make_backbone(s.backbone, w, s.input_size)
                            for f, w in self.inputs.fold_weights[self.target].items()}
        on_val = dict(self.common(seed), backbone=backbone, embeddings=self.emb.get("val"), folds=folds)
        sel = None
        if len(self.cands) > 1:  # the candidate is chosen on selection episodes
            sel = select_on_validation(self.cands, val, episodes=s.val_episodes, rule=s.val_rule, stream="selection",
                                       **on_val)
        strat = self.cands[sel.best if sel else 0]
        try:  # and scored, as every strategy is, on the shared validation episodes
            rows = run_episodes({self.label: strat}, val, episodes=s.validation_episodes(strat), target=self.target,
                                stream="validation", **on_val)
        except TrainingError:
            rows = []  # diverged on validation: not scored there, so never recommended
        return Validated(strat, sel, rows)

    def test(self, strat: Strategy, seed: int, episodes: int | None = None) -> list[dict]:
        """``strat`` on the test episodes."""
        return run_episodes({self.label: strat}, self.parts["test"], episodes=episodes or self.settings.episodes,
                            embeddings=self.emb.get("test"), target=self.target, backbone=self.backbone,
                            **self.common(seed))

    def frame(self, test_rows: list[dict], v: Validated | None, strat: Strategy) -> pd.DataFrame:
        """The test rows with the cell's validation columns."""
        df = pd.DataFrame(test_rows)
        df["chosen"] = json.dumps({k: strat.params()[k] for k in self.entry.search}, sort_keys=True)
        val_rows = v.rows if v else []
        df["val_accuracy"] = float(np.mean([r["accuracy"] for r in val_rows])) if val_rows else float("nan")
        sel = v.selection if v else None
        df["val_scores"] = json.dumps([[{k: c.params()[k] for k in self.entry.search}, a, n] for c, a, n in
                                       zip(self.cands, sel.scores, sel.steps)] if sel else [])
        # the strategy's accuracy per validation episode (index, accuracy): paired across strategies
        df["val_episodes"] = json.dumps([[int(r["episode"]), float(r["accuracy"])] for r in val_rows])
        return df


def run_cell(spec: dict, inputs: CellInputs) -> tuple[pd.DataFrame, str]:
    """The work of one few-shot cell. ``spec``: target, shots, seed, label and the strategy entry.
    Returns the test rows (each carrying the cell's validation accuracies) and a short line for
    the progress output."""
    cell = _Cell(spec, inputs)
    v = cell.validate(spec["seed"])
    strat = v.strategy if v else cell.cands[0]
    df = cell.frame(cell.test(strat, spec["seed"]), v, strat)
    chosen = df["chosen"].iloc[0]
    extra = f" (chose {chosen} on selection episodes)" if chosen != "{}" else ""
    return df, f"{100 * df['accuracy'].mean():.1f}%{extra}"


def validation_draws(spec: dict, inputs: CellInputs, draws: int, test_episodes: int) -> list[pd.DataFrame]:
    """For the honesty benchmark (``benchmarks/regret.py``): the cell's test rows on one large set of
    ``test_episodes`` episodes (seed ``spec["seed"]``), with the validation of draw ``d`` (validation
    and selection episodes of seed ``spec["seed"] + 1 + d``), one frame per draw. A searched entry
    may choose another candidate per draw; each candidate's test rows are computed once."""
    cell = _Cell(spec, inputs)
    tested: dict[str, list[dict]] = {}
    out = []
    for d in range(draws):
        v = cell.validate(spec["seed"] + 1 + d)
        strat = v.strategy if v else cell.cands[0]
        key = json.dumps(strat.params(), sort_keys=True)
        if key not in tested:
            tested[key] = cell.test(strat, spec["seed"], test_episodes)
        df = cell.frame(tested[key], v, strat)
        df["draw"] = d
        out.append(df)
    return out
