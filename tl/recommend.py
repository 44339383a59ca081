"""Recommend before training: rank (backbone, stage) candidates for a target's labelled shots by
transferability scores on frozen embeddings (``tl.transfer_scores``), in seconds, and say when the
ranking cannot tell the best candidates apart.

Every candidate is a backbone with weights, at each of its stages (the frozen-depth candidates: the
embedding after stage k is what fine-tuning with ``frozen: k`` starts from). Each score ranks the
candidates; the ensemble rank is the mean of those ranks (no score is reliable everywhere, Agostinelli
et al. 2022, "How stable are Transferability Metrics evaluations?"). The split's other images, unlabelled
(no label read), are the pool of ``pool_im``; with one shot per class the scores fitted to the shots
alone (LogME, H-score) favour the widest embedding, so there the ensemble is the pool's score (its
prototypes refined on the pool, as one image per class can be atypical; and the source head's, where
every candidate has one). "Can't tell": the top candidate ranks above the runner-up
(mean rank over the scores, the two compared alone) in fewer than 95% of bootstrap resamples (the shots
with replacement within each class, and the pool; at one shot per class without a pool a resample is
the same set, so no spread can be measured; and with a pool, the resamples of the pool miss the larger
spread, that of which image was drawn for each class: at one shot per class it always says "can't tell",
and leans to the top candidate).
The family rule: the best candidate at its backbone's last stage -> ``feature`` strategies on its
embeddings; at an earlier stage k -> ``finetune`` with ``frozen: k`` (its later stages are the
source-specific part).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.special import softmax

from tl.data.spec import DataSpec
from tl.errors import ConfigError, DataError
from tl.storage import Location
from tl.transfer_scores import POOL_REFINE, SCORES, SHOT_FITTED, all_scores

WIN_SHARE = 0.95


@dataclass(frozen=True)
class Candidate:
    """A backbone with weights (``pretrained``, ``pretrained:shift``, ``random``, a file or folder,
    ``torchvision:``/``timm:`` names); ``stages``: which stages to score (default every one); ``name``:
    its label in the table (default ``backbone (weights)``)."""

    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    input_size: int | None = None
    stages: list[int] | None = None
    name: str | None = None

    def label(self) -> str:
        return self.name or f"{self.backbone} ({self.weights})"


@dataclass(frozen=True)
class RecommendConfig:
    """``target``: a data spec (embedded name, or the user's labelled folder, CSV or Parquet); the
    ``shots`` per class are drawn by ``seed`` from its ``split`` (embedded targets: ``adapt``, never the
    test split; a user's data: every image unless ``split`` names a part of its split rule); ``pool``: at most
    this many of that split's other images, read without their labels, for ``pool_im`` (0: none)."""

    experiment: str = "recommend"
    candidates: list[Candidate] = field(default_factory=lambda: [Candidate()])
    target: str | DataSpec = "mnistm"
    shots: int = 5
    split: str | None = None
    seed: int = 0
    bootstrap: int = 100
    pool: int = 512

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ConfigError("config key 'candidates' needs at least one backbone")
        if self.shots < 1 or self.bootstrap < 0 or self.pool < 0:
            raise ConfigError("config keys 'shots' (at least 1), 'bootstrap' and 'pool' (at least 0) are out of range")
        labels = [c.label() for c in self.candidates]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"config key 'candidates': two candidates share the label '{labels[0]}'; give 'name'")


def stage_features(backbone, images: np.ndarray, stages: list[int], batch_size: int = 256) -> dict[int, np.ndarray]:
    """Pooled features after each of ``stages`` (1-based), what ``backbone(x, stage=s)`` gives: in one
    pass through the stages where they run in sequence (the last pooled by the backbone's own head, a
    timm model's included), else one forward per stage (timm ViTs)."""
    import torch

    backbone.eval()
    out: dict[int, list[np.ndarray]] = {s: [] for s in stages}
    last = backbone.num_stages
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = backbone.preprocessing(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
            if not getattr(backbone, "sequential", True):
                for s in stages:
                    out[s].append(backbone(x, stage=s).float().numpy())
                continue
            for s in range(1, max(stages) + 1):
                x = backbone.run_stages(x, s - 1, s)
                if s in out:
                    pooled = backbone(x, stage=s, start=s) if s == last else backbone._pool(x)
                    out[s].append(pooled.float().numpy())
    return {s: np.concatenate(v) for s, v in out.items()}


def source_probabilities(weights: str | None, features: np.ndarray) -> np.ndarray | None:
    """The source model's class probabilities on last-stage features, where ``weights`` is a
    pretraining folder with its head (``head.safetensors``) of the right width; else None."""
    from tl.pretrain import HEAD_FILE

    if not weights or not os.path.isfile(os.path.join(weights, HEAD_FILE)):
        return None
    from safetensors.numpy import load_file

    head = load_file(os.path.join(weights, HEAD_FILE))
    w, b = head.get("weight"), head.get("bias")
    if w is None or w.shape[1] != features.shape[1]:
        return None
    return softmax(features @ w.T + (b if b is not None else 0.0), axis=1)


def ensemble_ranks(table: np.ndarray, leave_out: tuple[int, ...] = ()) -> np.ndarray:
    """Mean rank per candidate (rows) over the scores (columns; higher is better, rank 1 the best),
    ignoring a score that is NaN for any candidate and the columns ``leave_out``; ties share their mean rank."""
    from scipy.stats import rankdata

    usable = [j for j in range(table.shape[1]) if j not in leave_out and np.isfinite(table[:, j]).all()]
    if not usable:
        return np.full(len(table), np.nan)
    ranks = np.stack([rankdata(-table[:, j]) for j in usable], axis=1)
    return ranks.mean(1)


def _score_table(feats: list[np.ndarray], probs: list[np.ndarray | None], y: np.ndarray,
                 pools: list[np.ndarray | None], skip: tuple[int, ...] = ()) -> np.ndarray:
    """Candidates x SCORES; the columns ``skip`` are not computed (NaN)."""
    names = tuple(s for j, s in enumerate(SCORES) if j not in skip)
    rows = (all_scores(f, y, p, q, names) for f, p, q in zip(feats, probs, pools))
    return np.array([[sc.get(s, np.nan) for s in SCORES] for sc in rows])


def _left_out(single: bool, has_pool: bool) -> tuple[int, ...]:
    """The score columns the ensemble leaves out: the shot-fitted ones at one shot per class when the pool
    score stands in for them (benchmarks/recommend.py: 25-33 points of regret with them there)."""
    return tuple(SCORES.index(s) for s in SHOT_FITTED) if single and has_pool else ()


def draw(data, shots: int, seed: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``shots`` labelled images per class of ``data`` (an ImageSet) drawn by ``seed``, and of up
    to ``pool`` of its other images for the unlabelled pool (sorted), as every recommendation draws them."""
    from tl.data.episodes import take_shots

    rows = take_shots(data.labels, data.classes, shots, seed, data.name)
    rest = np.setdiff1d(np.arange(len(data.labels)), rows)
    return rows, np.sort(np.random.default_rng(seed + 2).choice(rest, min(pool, len(rest)), replace=False))


def recommend(cfg: RecommendConfig, storage: "str | os.PathLike | Location", log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Score every (candidate, stage) on the target's shots; returns the ranked result (``recommend.yaml``'s
    content): rows best first, the recommended candidate, its family and rule, and whether it can tell."""
    from tl.data.spec import load_data, part, resolve
    from tl.models import input_size_of, make_backbone, num_stages
    from tl.pretrain import resolve_weights, weights_reference

    t0 = time.time()
    name, spec = resolve(cfg.target, "target")
    data = load_data(name, spec, None if spec is None else input_size_of(cfg.candidates[0].backbone,
                                                                      cfg.candidates[0].input_size),
                     "none", lazy=spec is not None)
    split = cfg.split or ("adapt" if spec is None else None)
    if split:
        data = part(data, split, spec, "target")
    rows, pool_rows = draw(data, cfg.shots, cfg.seed, cfg.pool)
    images, y = data.pixels(np.concatenate([rows, pool_rows])), data.labels[rows]  # the pool's labels are not read
    labels, feats, probs, pools, refs = [], [], [], [], []
    for cand in cfg.candidates:
        stages = cand.stages or list(range(1, num_stages(cand.backbone) + 1))
        weights = resolve_weights(cand.weights, cand.backbone, storage, log)
        backbone = make_backbone(cand.backbone, weights, cand.input_size)
        bad = [s for s in stages if not 1 <= s <= backbone.num_stages]
        if bad:
            raise ConfigError(f"candidate '{cand.label()}': backbone '{cand.backbone}' has stages 1..{backbone.num_stages}, "
                              f"not {bad}")
        by_stage = stage_features(backbone, images, stages)
        for s in stages:
            labels.append((cand, s, backbone.num_stages))
            feats.append(by_stage[s][: len(rows)])
            pools.append(by_stage[s][len(rows):] if len(pool_rows) else None)
            probs.append(source_probabilities(weights, feats[-1]) if s == backbone.num_stages else None)
        refs.append(weights_reference(cand.weights, weights))
    table = _score_table(feats, probs, y, pools)
    single = cfg.shots == 1
    leave_out = _left_out(single, len(pool_rows) > 0)
    ens = ensemble_ranks(table, leave_out)
    order = np.argsort(ens, kind="stable")
    seconds_scores = time.time() - t0
    if len(order) > 1:
        # one shot per class and no pool: every resample is the same set, so no spread can be measured, and
        # scores fitted to one image per class cannot tell class structure from width: can't tell
        blind = single and not len(pool_rows)
        n_boot = 0 if blind else cfg.bootstrap
        tied = ens[order[0]] == ens[order[1]]
        wins = None if blind else (0.0 if tied else _bootstrap(feats, probs, pools, y, order, n_boot, cfg.seed,
                                                                leave_out))
        second = labels[order[1]]
        # one shot per class, even with a pool: which image was drawn moves the ranking more than any resample
        # shows (benchmarks/pool_refine.py: weighted tau 0.56-0.72 over ten draws at mnistm 1-shot; before the
        # prototypes were refined on the pool, two draws' picks were 27.6 points below the best although each
        # won 100% of the pool's resamples): it leans, never tells
        verdict = {"can_tell": bool(not single and not tied and n_boot and wins >= WIN_SHARE), "wins": wins,
                   "runner_up": f"{second[0].label()} stage {second[1]}", "bootstrap": n_boot}
    else:
        verdict = {"can_tell": True, "wins": 1.0, "runner_up": None, "bootstrap": cfg.bootstrap}
    best_cand, best_stage, last = labels[order[0]]
    family = "feature" if best_stage == last else "finetune"
    rule = (f"stage {best_stage} is {best_cand.backbone}'s last: classify its embeddings (feature strategies)"
            if family == "feature" else
            f"stage {best_stage} of {last} ranks above the later stages: fine-tune them, frozen: {best_stage}")
    out_rows = []
    for rank, i in enumerate(order, 1):
        cand, s, n = labels[i]
        out_rows.append({"rank": rank, "candidate": cand.label(), "backbone": cand.backbone, "weights": cand.weights,
                         "stage": int(s), "stages": int(n), "ensemble_rank": float(ens[i]),
                         "scores": {k: (None if not np.isfinite(v) else float(v)) for k, v in zip(SCORES, table[i])}})
    result = {"experiment": cfg.experiment, "target": name if spec is None else spec.where, "split": split or "all",
              "shots": cfg.shots, "seed": cfg.seed, "images": int(len(rows)), "pool": int(len(pool_rows)),
              "ensemble_of": [s for j, s in enumerate(SCORES) if j not in leave_out and np.isfinite(table[:, j]).all()], "classes": list(data.classes),
              "candidates": [{"name": c.label(), **r} for c, r in zip(cfg.candidates, refs)],
              "rows": out_rows,
              "recommended": {"candidate": best_cand.label(), "backbone": best_cand.backbone,
                              "weights": best_cand.weights, "stage": int(best_stage), "family": family,
                              "frozen": int(best_stage) if family == "finetune" else None, "rule": rule},
              **verdict, "seconds": round(time.time() - t0, 3), "seconds_scoring": round(seconds_scores, 3)}
    log(f"[recommend] {name}, {cfg.shots}-shot: {best_cand.label()} stage {best_stage} -> {family}"
        f"{'' if verdict['can_tell'] else ' (cannot tell it from ' + verdict['runner_up'] + ')'} "
        f"in {result['seconds']:.1f} s")
    return result


def _bootstrap(feats, probs, pools, y, order, n_boot: int, seed: int, leave_out: tuple[int, ...]) -> float:
    """The share of resamples of the shots (within each class, with replacement) and of the pool in
    which the top candidate ranks above the runner-up over the scores, the two compared alone (their mean
    rank between the two; only these two are scored again, which keeps a recommendation to seconds)."""
    from sklearn import config_context
    from threadpoolctl import threadpool_limits

    pair = [order[0], order[1]]
    rng = np.random.default_rng(seed + 1)
    classes = np.unique(y)
    wins = 0
    # hundreds of small products: one BLAS thread is faster than many, and scikit-learn's argument checks
    # (Ledoit-Wolf) cost more than the arithmetic here
    with threadpool_limits(1), config_context(skip_parameter_validation=True):
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(np.flatnonzero(y == c), (y == c).sum(), replace=True) for c in classes])
            q = None if pools[pair[0]] is None else rng.integers(0, len(pools[pair[0]]), len(pools[pair[0]]))
            ens = ensemble_ranks(_score_table([feats[i][idx] for i in pair],
                                              [None if probs[i] is None else probs[i][idx] for i in pair], y[idx],
                                              [None if q is None else pools[i][q] for i in pair], leave_out),
                                 leave_out)
            wins += int(ens[0] < ens[1])
    return wins / n_boot if n_boot else float("nan")


def write_outputs(result: dict[str, Any], folder: "str | os.PathLike") -> None:
    """``recommend.yaml`` (the result) and ``recommend.md`` (the ranked table, the family and its rule)."""
    from pathlib import Path

    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recommend.yaml").write_text(yaml.safe_dump(result, sort_keys=False))
    rec = result["recommended"]
    why = ("one labelled image per class and no unlabelled pool: no resample can measure the scores' spread"
           if result["wins"] is None else
           f"one labelled image per class: which image was drawn moves the ranking more than resampling shows "
           f"(the top candidate beats it in {result['wins']:.0%} of {result['bootstrap']} resamples of the pool)"
           if result["shots"] == 1 else
           f"the top candidate beats it in {result['wins']:.0%} of {result['bootstrap']} resamples of the shots "
           f"{'and the pool ' if result['pool'] else ''}(needs {WIN_SHARE:.0%})")
    verdict = (f"Recommended: **{rec['candidate']}, stage {rec['stage']}** -> **{rec['family']}** "
               f"({rec['rule']})." if result["can_tell"] else
               f"**Can't tell** {rec['candidate']} stage {rec['stage']} from {result['runner_up']}: {why}. "
               f"Leaning: {rec['candidate']} stage {rec['stage']} -> {rec['family']} ({rec['rule']}).")
    lines = [f"# Recommendation for {result['target']} ({result['shots']} shots per class, split "
             f"`{result['split']}`, seed {result['seed']})", "",
             verdict, "",
             f"Scores on the frozen embeddings of {result['images']} labelled images and {result['pool']} unlabelled "
             f"ones of the same split (pool_im; their labels are not read); higher is better for each; the ensemble "
             f"rank is the mean of the per-score ranks of {', '.join(result['ensemble_of'])} (1 = best; a score "
             f"missing for any candidate is left out"
             + ("; with one shot per class LogME and H-score are left out: fitted to one image per class they favour "
                f"the widest embedding, and pool_im's prototypes are refined on the pool (soft k-means, {POOL_REFINE} steps)"
                if result["shots"] == 1 and result["pool"] else "")
             + f"). LEEP and NCE need the source model's head: the last stage of a pretraining folder only. "
             f"Computed in {result['seconds']:.1f} s.", "",
             "| rank | candidate | stage | ensemble rank | " + " | ".join(SCORES) + " |",
             "|---|---|---|---|" + "---|" * len(SCORES)]
    for r in result["rows"]:
        cells = ["—" if r["scores"][k] is None else f"{r['scores'][k]:.4g}" for k in SCORES]
        lines.append(f"| {r['rank']} | {r['candidate']} | {r['stage']} of {r['stages']} | {r['ensemble_rank']:.2f} | "
                     + " | ".join(cells) + " |")
    (folder / "recommend.md").write_text("\n".join(lines) + "\n")


def for_comparison(cfg: Any, weights: str | None, storage: "str | os.PathLike | Location",
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The recommendation for each (target, shots) of a comparison, made before its cells run: its backbone's
    stages as the candidates, the shots drawn from the validation split (never a test image). A target without
    validation images (a user's ``split: none``) gets none."""
    out = []
    for target in cfg.targets:
        spec = cfg.spec(target)
        if spec is not None and spec.split == "none":
            log(f"[recommend] {target}: no validation split (split: none), no recommendation")
            continue
        for shots in cfg.shots:
            rc = RecommendConfig(candidates=[Candidate(backbone=cfg.backbone, weights=weights or "random",
                                                       input_size=cfg.input_size, name=cfg.backbone)],
                                 target=spec if spec is not None else target, shots=shots, split=cfg.val_split,
                                 seed=cfg.seeds[0])
            try:
                res = recommend(rc, storage, log)
            except DataError as exc:  # too few validation images for these shots: the comparison still runs
                log(f"[recommend] {target} {shots}-shot: no recommendation ({exc})")
                continue
            # keyed by the comparison's target name, as its summary and best.yaml are (a user's data is its
            # path in ``res["target"]``, kept as ``data``), so outcome_markdown finds its rows
            out.append({**res, "target": target, **({"data": res["target"]} if spec is not None else {})})
    return out


def outcome_markdown(recs: list[dict[str, Any]], summary: "Any", families: dict[str, str], best: dict) -> str:
    """summary.md's section that sets each recommendation made before the run beside the measured result:
    the best feature and the best fine-tuning rows on the test episodes, and the family of the strategy
    recommended on validation episodes."""
    if not recs:
        return ""
    lines = ["## Predicted before the run, against the outcome", "",
             "`tl.recommend` ranked the backbone's stages by transferability scores on the validation split's shots "
             "before any cell ran (recommend.yaml). Family rule: the last stage ranked first -> feature strategies; an "
             "earlier stage k -> fine-tuning with frozen: k. Outcome: the best row of each family on the test "
             "episodes, and the family of the strategy recommended on validation episodes.", "",
             "| target | shots | predicted | can tell | best feature row | best fine-tuning row | recommended (validation) "
             "| prediction held | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t, k = r["target"], r["shots"]
        rows = summary[(summary["target"] == t) & (summary["shots"] == k)]
        rows = rows.assign(family=[families.get(s, "") for s in rows["strategy"]])

        def top(fam: str) -> str:
            g = rows[rows["family"] == fam].sort_values("mean", ascending=False)
            return "—" if g.empty else f"{g.iloc[0]['strategy']} {100 * g.iloc[0]['mean']:.1f}"

        rec = r["recommended"]
        chosen = best.get(str(t), {}).get(int(k), {}).get("label")
        fam = families.get(chosen, "") if chosen else ""
        predicted = f"{rec['family']} (stage {rec['stage']})"
        held = "—" if not fam else ("yes" if fam == rec["family"] else "no")
        lines.append(f"| {t} | {k} | {predicted} | {'yes' if r['can_tell'] else 'no'} | {top('feature')} | "
                     f"{top('finetune')} | {chosen or '—'} ({fam or '?'}) | {held} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
