"""Ray Tune search over a strategy's hyper-parameters (frozen depth, learning rates, ...).

The trial is a plain function (Train V2: no ``Tuner(trainer)``). It scores a candidate on
*validation* episodes drawn from the target's ``adapt`` split, which shares no image with the
``test`` split; the chosen candidate is then evaluated once on test episodes. The budget is
training steps: every candidate's episode models are advanced to the next milestone and the
mean validation accuracy is reported, so ASHA (Li et al. 2020, "A System for Massively Parallel
Hyperparameter Tuning") can stop a weak candidate early and the compute it used is the steps it
reached.

A search space is YAML: ``key: {grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (a bare list means ``choice``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from ray import tune

from tl.config import BackboneFields, EpisodeFields, config_hash, to_dict
from tl.data.episodes import query_folds
from tl.errors import ConfigError, TLError
from tl.grid import TrialProgress, quiet_tune
from tl.data.spec import DataSpec, resolve
from tl.models import input_size_of, num_stages
from tl.report import describe, write_best, write_config, write_reports
from tl.runtime import check_shared_storage, cluster_gpus, gpu_share
from tl.storage import Location
from tl.strategies import make_strategy

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def _space_spec(key: str, spec: Any) -> tuple[str, list]:
    if isinstance(spec, (list, tuple)):
        spec = {"choice": list(spec)}
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"search space key 'space.{key}': write one of {{{', '.join(SPACE_KINDS)}}}: [...], got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind not in SPACE_KINDS:
        raise ConfigError(f"search space key 'space.{key}': unknown kind '{kind}' (known: {', '.join(SPACE_KINDS)})")
    if not isinstance(arg, (list, tuple)) or not arg:
        raise ConfigError(f"search space key 'space.{key}': '{kind}' has an empty list of values")
    arg = list(arg)
    if kind in ("uniform", "loguniform", "randint"):
        if len(arg) != 2 or not all(isinstance(v, (int, float)) for v in arg) or not arg[0] < arg[1]:
            raise ConfigError(f"search space key 'space.{key}': '{kind}' needs [low, high] with low < high, got {arg}")
        if kind == "loguniform" and arg[0] <= 0:
            raise ConfigError(f"search space key 'space.{key}': 'loguniform' needs low > 0, got {arg}")
    return kind, arg


def check_space(space: Mapping[str, Any], strategy: str, params: Mapping[str, Any], backbone: str) -> None:
    """Every key is a hyper-parameter of ``strategy`` and every value builds a valid strategy."""
    if not space:
        raise ConfigError("config key 'space': the search space is empty")
    stages = num_stages(backbone)
    for key, spec in space.items():
        kind, arg = _space_spec(key, spec)
        values = arg if kind in ("grid", "choice") else arg[:1]
        for v in values:
            make_strategy(strategy, {**params, key: v}).check_depth(stages, f"search space key 'space.{key}'")


GRID_KEY = "grid_point"


def tune_space(space: Mapping[str, Any], shuffle_seed: int | None = None) -> dict[str, Any]:
    """The YAML space as Ray Tune domains.

    With ``shuffle_seed``, the grid keys become one ``grid_point`` whose values are the grid's points
    in a seeded random order. Why: asynchronous successive halving (ASHA, Li et al. 2020) promotes a
    trial when it is in the top 1/eta of those that reached the rung before it, so the first arrivals
    are promoted almost unconditionally; Tune lays a grid out in order (learning rates ascending), so
    in that order the later, often better candidates keep beating the early ones and most get
    promoted. A random order spreads good and bad candidates over the run."""
    import itertools
    import random

    from ray import tune

    out: dict[str, Any] = {}
    grid: dict[str, list] = {}
    for key, spec in space.items():
        kind, arg = _space_spec(key, spec)
        if kind == "grid" and shuffle_seed is not None:
            grid[key] = list(arg)
            continue
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](arg) if kind in ("grid", "choice") else \
            {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*arg)
    if grid:
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        random.Random(shuffle_seed).shuffle(points)
        out[GRID_KEY] = tune.grid_search(points)
    return out


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config with a shuffled grid's ``grid_point`` spread back into its keys."""
    return {k: v for k, v in {**config, **(config.get(GRID_KEY) or {})}.items() if k != GRID_KEY}


def candidate(config: Mapping[str, Any], keys) -> dict[str, Any]:
    """A trial's values of the search keys, whether its grid was shuffled into ``grid_point`` or not."""
    flat = flat_config(config)
    return {k: flat.get(k) for k in keys}


def report_steps(max_steps: int, grace: int, factor: float) -> list[int]:
    """ASHA's rung milestones grace * factor^i below ``max_steps``, then ``max_steps``."""
    out, t = [], float(grace)
    while t < max_steps:
        out.append(int(round(t)))
        t *= factor
    return sorted(set(out + [max_steps]))


def _default_space() -> dict[str, Any]:
    return {"frozen": {"grid": [0, 1, 2, 3, 4]}, "lr": {"grid": [0.003, 0.01, 0.03, 0.1]}}


@dataclass(frozen=True)
class SearchConfig(BackboneFields, EpisodeFields):
    """``scheduler``: ``asha`` (early stopping, budget in training steps) or ``none`` (full grid);
    ``search_alg``: ``grid`` (Tune's variant generator: grid and random sampling) or ``optuna``
    (needs the ``optuna`` extra and no ``grid`` keys); ``grid_order``: ``shuffled`` (the grid's points
    in an order seeded by ``seed``: ASHA wastes less on it, see :func:`tune_space`) or ``given``."""

    experiment: str = "search"
    target: str | DataSpec = "mnistm"
    shots: int = 5
    val_split: str = "adapt"
    test_split: str = "test"
    val_episodes: int = 10
    test_episodes: int = 100
    seed: int = 0
    strategy: str = "finetune"
    params: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=_default_space)
    num_samples: int = 1
    scheduler: str = "asha"
    max_steps: int = 60
    grace_steps: int = 0
    reduction_factor: float = 3.0
    search_alg: str = "grid"
    cpus_per_trial: float = 1.0
    gpu_per_trial: float | None = None
    max_concurrent: int = 0
    grid_order: str = "shuffled"

    def __post_init__(self) -> None:
        if self.grid_order not in ("shuffled", "given"):
            raise ConfigError(f"config key 'grid_order': '{self.grid_order}' is not one of shuffled, given")
        if self.scheduler not in ("asha", "none"):
            raise ConfigError(f"config key 'scheduler': '{self.scheduler}' is not one of asha, none")
        if self.search_alg not in ("grid", "optuna"):
            raise ConfigError(f"config key 'search_alg': '{self.search_alg}' is not one of grid, optuna")
        if self.shots < 1 or self.val_episodes < 1 or self.test_episodes < 1 or self.max_steps < 1:
            raise ConfigError("config keys 'shots', 'val_episodes', 'test_episodes' and 'max_steps' must be at least 1")
        if self.reduction_factor <= 1:
            raise ConfigError("config key 'reduction_factor' must be greater than 1")
        if not 0 < self.cpus_per_trial:
            raise ConfigError("config key 'cpus_per_trial' must be positive")
        if self.val_split == self.test_split:
            raise ConfigError(f"config keys 'val_split' and 'test_split' are both '{self.test_split}': validation "
                              f"episodes must share no image with test episodes")
        resolve(self.target, "target")
        make_strategy(self.strategy, self.params)
        check_space(self.space, self.strategy, self.params, self.backbone)
        if self.search_alg == "optuna":
            grids = [k for k, v in self.space.items() if _space_spec(k, v)[0] == "grid"]
            if grids:
                raise ConfigError(f"search space keys {grids}: 'grid' cannot be used with search_alg optuna "
                                  f"(use choice)")

    @property
    def target_name(self) -> str:
        return resolve(self.target, "target")[0]

    @property
    def target_spec(self) -> "DataSpec | None":
        """The user's data (``split`` unset: halves, since the search needs validation images)."""
        spec = resolve(self.target, "target")[1]
        return spec.with_defaults(input_size_of(self.backbone, self.input_size), "halves") if spec is not None else None

    def milestones(self) -> list[int]:
        grace = self.grace_steps or max(1, int(round(self.max_steps / self.reduction_factor**2)))
        return report_steps(self.max_steps, grace, self.reduction_factor)


def _search_trial(config: dict, *, data, embeddings, weights, folds, fixed: dict) -> None:
    """One candidate: validation episodes advanced milestone by milestone, reported to Tune.
    ``weights``/``embeddings``: one, or ``{fold: ...}`` per validation fold (``bn_stats: target``)."""
    from tl.evaluate import staged_accuracy
    from tl.models import make_backbone
    from tl.runtime import assigned_threads

    assigned_threads()  # what Ray assigned the trial, on its node
    params = {**fixed["params"], **candidate(config, fixed["keys"])}
    strat = make_strategy(fixed["strategy"], params)
    if strat.budget_key:
        strat = make_strategy(fixed["strategy"], {**params, strat.budget_key: fixed["max_steps"]})
    if strat.uses_embeddings:
        backbone = None
    elif isinstance(weights, dict):
        backbone = {f: make_backbone(fixed["backbone"], w, fixed["input_size"]) for f, w in weights.items()}
    else:
        backbone = make_backbone(fixed["backbone"], weights, fixed["input_size"])
    episodes = fixed["val_episodes"]

    pool = {"images": 0}

    def report(steps: int, acc: float) -> None:
        tune.report({"val_accuracy": acc, "steps": steps, "trial_steps": steps * episodes, "pool": pool["images"],
                     "failed": ""})

    try:
        # a strategy that uses the target's unlabelled pool gets it, as in the test phase: the validation
        # split, less each episode's own queries (tl.evaluate.episodes)
        staged_accuracy(strat, data, shots=fixed["shots"], queries=fixed["queries"], episodes=episodes,
                        seed=fixed["seed"], report_steps=fixed["milestones"], n_way=fixed["n_way"],
                        backbone=backbone, embeddings=embeddings, unlabelled=data if strat.uses_pool else None,
                        folds=folds,
                        on_report=report, on_pool=lambda n: pool.update(images=n))
    except TLError as exc:
        # a candidate that diverges is a result (the worst one), not a crash that Tune retries
        tune.report({"val_accuracy": 0.0, "steps": fixed["max_steps"], "trial_steps": 0, "pool": pool["images"],
                     "failed": str(exc)})


def run_search(cfg: SearchConfig, storage: "str | os.PathLike | Location", output: Path,
               log: Callable[[str], None] = print) -> "SearchResult":
    """Search on validation episodes, then evaluate the chosen candidate on test episodes.

    Writes ``trials.csv`` (every candidate: its values, validation accuracy, steps reached, and the
    unlabelled pool images each of its episodes got at least: 0 for a strategy that uses none),
    ``best.yaml``, and the test ``rows.parquet``/``summary.md``/``accuracy_vs_shots.png`` to ``output``.
    """
    from tl.data.spec import check_files_of, check_target, load_target
    from tl.embeddings import EmbedConfig, extract
    from tl.pretrain import resolve_weights, weights_identity

    t0 = time.time()
    storage = Location.of(storage)
    check_shared_storage(storage)  # on several nodes, a folder one of them cannot see stops here
    output.mkdir(parents=True, exist_ok=True)
    # a user's folder stays files: each trial's episodes decode their own images
    target = load_target(cfg.target_name, cfg.target_spec, cfg.test_split, cfg.val_split,
                         input_size_of(cfg.backbone, cfg.input_size), lazy=True)
    if target["val"] is None:
        raise ConfigError(f"config key 'target': the search needs validation images, and split none keeps every image "
                          f"of '{cfg.target_name}' for test episodes: use split halves")
    check_target(target, cfg.target_name, cfg.shots)
    check_files_of(target)  # bad files stop here, before any pretraining or trial
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    val, test = target["val"], target["test"]
    strat0 = make_strategy(cfg.strategy, cfg.params)
    if "bn_stats" in cfg.space:
        raise ConfigError("config key 'space.bn_stats': bn_stats cannot be searched (each value needs its own "
                          "embeddings and backbone): run one search per value")
    # validation episodes take each episode's queries from one fold of the split (tl.data.episodes.query_folds)
    folds = query_folds(val.labels)
    # candidates of bn_stats target start from (or embed with) the target's statistics: on the validation
    # episodes those estimated without the episode's fold, on the test episodes those of the whole split
    trial_weights: "str | None | dict[int, str | None]" = weights
    if strat0.bn_stats_at_start == "target":
        from tl.embeddings import fold_bn_stats, target_bn_stats

        run_weights = target_bn_stats(cfg.backbone, weights, cfg.input_size, val, storage / "cache", log)
        trial_weights = fold_bn_stats(cfg.backbone, weights, cfg.input_size, val, storage / "cache", log)
    else:
        run_weights = weights
    val_emb = test_emb = None
    gpu = gpu_share(cfg.gpu_per_trial, cluster_gpus()) if strat0.budget_key else 0.0  # trained candidates only
    if strat0.uses_embeddings:
        def vectors(w, split):
            ecfg = EmbedConfig.on_cluster(backbone=cfg.backbone, weights=w, input_size=cfg.input_size,
                                          cpus_per_actor=min(1.0, cfg.cpus_per_trial))
            return extract(split, ecfg, storage / "cache", log).vectors

        val_emb = ({f: vectors(w, val) for f, w in trial_weights.items()} if isinstance(trial_weights, dict)
                   else vectors(weights, val))
        test_emb = vectors(run_weights, test)
    trained = bool(strat0.budget_key)
    milestones = cfg.milestones() if trained else [cfg.max_steps]
    fixed = {"strategy": cfg.strategy, "params": dict(cfg.params), "keys": sorted(cfg.space), "backbone": cfg.backbone,
             "input_size": cfg.input_size, "shots": cfg.shots, "queries": cfg.queries, "n_way": cfg.n_way,
             "seed": cfg.seed, "val_episodes": cfg.val_episodes, "max_steps": cfg.max_steps, "milestones": milestones}
    scheduler = None
    if cfg.scheduler == "asha" and trained:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="steps", max_t=cfg.max_steps, grace_period=milestones[0],
                                  reduction_factor=cfg.reduction_factor)
    search_alg = None
    if cfg.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch(seed=cfg.seed)
        except (ImportError, AssertionError) as exc:
            raise ConfigError("config key 'search_alg': optuna is not installed (pip install 'tl[optuna]')") from exc
    # protocol 2: candidates that use the target's pool get it, on the validation stream of episodes;
    # a search of the former protocol is not resumed into this one
    name = (f"{cfg.experiment}-"
            f"{config_hash({**to_dict(cfg), 'weights': weights_identity(cfg.weights), 'protocol': 2}, 8)}")
    path = storage / "tune" / name
    trainable = tune.with_resources(
        tune.with_parameters(_search_trial, data=val, embeddings=val_emb, weights=trial_weights, folds=folds,
                             fixed=fixed),
        {"cpu": cfg.cpus_per_trial if trained else min(cfg.cpus_per_trial, 0.25), "gpu": gpu})
    n_grid = int(np.prod([len(_space_spec(k, v)[1]) for k, v in cfg.space.items()
                          if _space_spec(k, v)[0] == "grid"] or [1]))
    total = n_grid * cfg.num_samples
    log(f"[search] {cfg.strategy} on {cfg.target_name} {cfg.shots}-shot: {total} candidates x {cfg.val_episodes} "
        f"validation episodes ({cfg.val_split} split), milestones {milestones} steps, scheduler {cfg.scheduler}, "
        f"search {cfg.search_alg}")
    run_config = tune.RunConfig(name=name, **(storage / "tune").ray_storage(), verbose=0,
                                callbacks=[TrialProgress(log, total, "search", _describe)])
    check_shared_storage(storage)  # before any trial: every node must see the search's folder
    tuner, resumed = None, False
    if tune.Tuner.can_restore(path.path, storage_filesystem=path.ray_filesystem):
        try:
            tuner = tune.Tuner.restore(path.path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=path.ray_filesystem)
            resumed = True
            log(f"[search] resuming the search in {path} (finished candidates are kept)")
        except Exception as exc:  # a state file cut short by a crash: keep it aside, start afresh
            aside = path.parent / f"{path.name}.unreadable-{int(time.time())}"
            path.fs.move(path.path, aside.path)
            log(f"[search] could not restore {path} ({type(exc).__name__}); moved it to {aside}, starting afresh")
    if tuner is None:
        space = tune_space(cfg.space, cfg.seed if cfg.grid_order == "shuffled" else None)
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=scheduler,
                                                       search_alg=search_alg, num_samples=cfg.num_samples,
                                                       max_concurrent_trials=cfg.max_concurrent or None,
                                                       # a finished candidate's process takes the next one: no
                                                       # interpreter and torch import per candidate (as tl.grid)
                                                       reuse_actors=True))
    with quiet_tune():
        grid = tuner.fit()
    trials = []
    for res in grid:
        if res.error is not None or res.metrics is None or "val_accuracy" not in res.metrics:
            trials.append({**candidate(res.config, cfg.space), "val_accuracy": float("nan"),
                           "steps": 0, "trial_steps": 0, "pool": 0, "failed": str(res.error).splitlines()[0] or "error"})
            continue
        m = res.metrics
        trials.append({**candidate(res.config, cfg.space), "val_accuracy": m["val_accuracy"],
                       "steps": m["steps"], "trial_steps": m["trial_steps"], "pool": int(m.get("pool", 0)),
                       "failed": m.get("failed", "")})
    ok = [t for t in trials if not t["failed"] and not math.isnan(t["val_accuracy"])]
    if not ok:
        raise TLError("every search candidate failed:\n" + "\n".join(str(t["failed"]) for t in trials))
    # best among candidates that reached the full budget (ASHA stopped the others on a lower rung)
    full = [t for t in ok if t["steps"] >= max(milestones)] or ok
    best_row = max(full, key=lambda t: t["val_accuracy"])
    chosen = {k: best_row[k] for k in cfg.space}
    table = pd.DataFrame(trials)
    params = {**cfg.params, **chosen}
    if trained:
        params[strat0.budget_key] = cfg.max_steps
    table = table.sort_values(["val_accuracy"], ascending=False)
    table.to_csv(output / "trials.csv", index=False)
    log(f"[search] chosen on validation episodes: {chosen} (validation accuracy {100 * best_row['val_accuracy']:.1f}%, "
        f"compute {int(table['trial_steps'].sum())} episode-steps); evaluating on {cfg.test_episodes} test episodes")
    rows = _test_phase(cfg, params, run_weights, {"test": test, "val": val}, test_emb, storage, log, gpu)
    note = describe(to_dict(cfg), cfg.test_split, rows, weights,
                    f", except {', '.join(cfg.space)}, chosen by a Ray Tune search on {cfg.val_episodes} validation "
                    f"episodes of the `{cfg.val_split}` split, which shares no image with the test episodes")
    summary, _ = write_reports(rows, output, note, f"{cfg.strategy} chosen by search on {cfg.target_name}")
    write_config(output, to_dict(cfg))
    test_acc = float(rows["accuracy"].mean())
    top = summary.iloc[0]
    entry = {"label": rows["strategy"].iloc[0], "strategy": cfg.strategy, "params": params,
             "accuracy": round(test_acc, 4), "ci95": round(float(top["ci95"]), 4), "episodes": int(top["episodes"]),
             "chosen_on_validation": chosen, "val_accuracy": round(float(best_row["val_accuracy"]), 4)}
    write_best(output / "best.yaml", cfg, weights, {cfg.target_name: {cfg.shots: entry}},
               f"chosen by a Ray Tune search on {cfg.val_episodes} validation episodes of the `{cfg.val_split}` split",
               search={"trial_steps": int(table["trial_steps"].sum()), "experiment": str(path)})
    log(f"[search] test accuracy {100 * test_acc:.1f}% over {cfg.test_episodes} episodes; {output / 'best.yaml'} "
        f"({time.time() - t0:.0f} s)")
    return SearchResult(params=params, chosen=chosen, val_accuracy=float(best_row["val_accuracy"]),
                        test_accuracy=test_acc, trial_steps=int(table["trial_steps"].sum()), trials=table,
                        wall_s=time.time() - t0, output=output, resumed=resumed)


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(flat_config(config).items()))


def _test_phase(cfg: SearchConfig, params: dict, weights: str | None, data: dict, test_emb, storage: Location,
                log: Callable[[str], None], gpu: float = 0.0) -> pd.DataFrame:
    """The chosen candidate on the test episodes: one cell of the grid engine (kept, so a rerun
    of the same search reuses it). ``weights``: those the candidates ran with (target statistics
    for ``bn_stats: target``)."""
    from tl.evaluate import CellInputs, EpisodeSettings, run_cell
    from tl.grid import Cell, CellStore, run_cells, stamp
    from tl.pretrain import weights_identity
    from tl.strategies import StrategyEntry

    entry = StrategyEntry(cfg.strategy, params=params)
    label = entry.name()
    identity = {"backbone": cfg.backbone, "weights": weights_identity(cfg.weights), "input_size": cfg.input_size,
                "test_split": cfg.test_split, "n_way": cfg.n_way, "queries": cfg.queries,
                "episodes": cfg.test_episodes, "strategy": cfg.strategy, "params": params}
    if cfg.target_spec is not None:
        identity["data"] = cfg.target_spec.identity()  # the user's images change every row
    cell = Cell.make((cfg.target_name, f"{cfg.shots}shot", f"seed{cfg.seed}", label), identity,
                     f"{cfg.target_name} {cfg.shots}-shot seed {cfg.seed} {label} (test episodes)",
                     {"target": cfg.target_name, "shots": cfg.shots, "seed": cfg.seed, "label": label, "entry": entry.plain()},
                     cpu=min(1.0, cfg.cpus_per_trial), gpu=gpu)
    store = CellStore(storage / "runs" / cfg.experiment / "cells")
    bn = entry.build().bn_stats
    settings = EpisodeSettings(backbone=cfg.backbone, input_size=cfg.input_size, queries=cfg.queries, n_way=cfg.n_way,
                               episodes=cfg.test_episodes, val_episodes=cfg.val_episodes,
                               validate=False)  # the search itself was the validation
    shared = {"inputs": CellInputs(data={cfg.target_name: data}, settings=settings, weights=weights,
                                   embeddings={cfg.target_name: {bn: {"test": test_emb}}},
                                   target_weights={cfg.target_name: weights})}
    res = run_cells([cell], store, run_cell, shared=shared, what="search", storage=storage, log=log,
                    experiment=f"{cfg.experiment}-test")
    if res.failed or res.unfinished:
        raise TLError(f"the test episodes of the chosen candidate did not finish: "
                      f"{res.failed[0][1] if res.failed else 'interrupted'}")
    return stamp(res.rows(store), to_dict(cfg))


@dataclass
class SearchResult:
    """The search's choice and what it cost; ``trials``: every candidate (also in trials.csv)."""

    params: dict
    chosen: dict
    val_accuracy: float
    test_accuracy: float
    trial_steps: int
    trials: pd.DataFrame
    wall_s: float
    output: Path
    resumed: bool = False
