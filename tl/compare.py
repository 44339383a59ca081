"""The strategy comparison: strategies x targets x shots x seeds, each cell a trial of ``tl.grid``.

Every cell runs on the same seeded episodes (paired differences). A strategy entry may carry a
small ``search`` (for example ``frozen: [0, 1, 2, 3, 4]``): the cell then scores each candidate on
validation episodes of the target's ``adapt`` split (no image shared with the test episodes),
keeps the best, and evaluates it on the test episodes ("nested search is a loop, not a
nested Tuner"). Finished cells live in ``<storage>/runs/<experiment>/cells`` (``tl.grid``), so an
interrupted comparison loses at most its unfinished cells and no row is ever written twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from tl.config import BackboneFields, EpisodeFields, to_dict
from tl.data.spec import DataSpec, check_files_of, check_target, load_target, resolve
from tl.errors import ConfigError, TrainingError, grid_exit_status
from tl.evaluate import VAL_RULES, CellInputs, EpisodeSettings, run_cell
from tl.grid import Cell, CellStore, GridResult, plan, run_cells, stamp
from tl.models import input_size_of, num_stages
from tl.runtime import check_shared_storage, cluster_gpus, gpu_share
from tl.storage import Location
from tl.strategies import StrategyEntry, check_labels


def _default_entries() -> tuple[StrategyEntry, ...]:
    """Every family once, on the defaults of its strategies: feature classifiers on frozen embeddings
    (``prototype``, ``logistic``), the same with the target's unlabelled images (``prototype`` with
    target BatchNorm statistics; ``bd_cspn``, transductive), fine-tuning at a frozen depth searched
    per cell, ``lp_ft``, and domain adaptation (``dann``). The default comparison is the demo's: it
    answers in about six minutes on 2 cores, set-up and pretraining included; the fuller grid of
    results/compare (11 entries, both targets, 1/5/10 shots) is workflows/configs/compare-full.yaml."""
    return (
        StrategyEntry("prototype"), StrategyEntry("logistic"),
        StrategyEntry("prototype", label="prototype_bn_target", params={"bn_stats": "target"}),
        StrategyEntry("bd_cspn"),
        StrategyEntry("finetune", search={"frozen": [2, 3, 4]}),
        StrategyEntry("lp_ft"), StrategyEntry("dann"),
    )


@dataclass(frozen=True)
class CompareConfig(BackboneFields, EpisodeFields):
    """The main job. ``episodes`` test episodes per cell; ``val_episodes``: validation episodes of a
    trained strategy (and selection episodes per candidate of a searched entry, which chooses its
    candidate on other episodes than the validation ones that score it); ``feature_val_episodes``:
    validation episodes of a feature strategy (milliseconds each: enough for ties to be told);
    ``tie_margin``: the practical equivalence (an accuracy fraction) within which a strategy ties
    with the validation winner (``tl.choice``); ``val_rule``: how a cell's search spends its
    selection episodes (``halving``: successive halving, a third of the steps for every candidate
    and the full budget for the best third; ``full``: every candidate to its full budget);
    ``cpus_per_trial`` for a trained cell (a feature cell takes ``feature_cpus``: many run at once);
    ``gpu_per_trial``: the GPU fraction of a trained cell (unset: 0.25 where the cluster has GPUs, so
    four cells share one, and 0 on a CPU-only cluster); ``max_failures``: Tune retries of a trial lost to a dead node or process; ``mlflow``: an MLflow
    tracking URI (or a local folder) that also gets every trial as a run, a trained cell's alone and a
    trial of feature cells with one step per cell (the ``mlflow`` extra)."""

    experiment: str = "demo"
    targets: tuple[str | DataSpec, ...] = ("mnistm",)
    test_split: str = "test"
    val_split: str = "adapt"
    shots: tuple[int, ...] = (1, 5)
    episodes: int = 10
    val_episodes: int = 4
    feature_val_episodes: int = 100
    tie_margin: float = 0.01
    val_rule: str = "halving"
    seeds: tuple[int, ...] = (0,)
    strategies: tuple[StrategyEntry, ...] = field(default_factory=_default_entries)
    cpus_per_trial: float = 1.0
    feature_cpus: float = 0.25
    gpu_per_trial: float | None = None
    max_concurrent: int = 0
    max_failures: int = 2
    mlflow: str = ""
    data: dict[str, DataSpec] = field(default_factory=dict)
    recommend: bool = True

    def __post_init__(self) -> None:
        # every target becomes a name, the user's data an entry of ``data`` under it (one spelling
        # in config.yaml and in cell identities, whether it came as a path, a mapping or a name)
        names, data = [], dict(self.data)
        for i, t in enumerate(self.targets):
            name, spec = resolve(t, f"targets[{i}]", data)
            if spec is not None and data.get(name, spec) != spec:
                raise ConfigError(f"config key 'targets[{i}]': two different datasets are named '{name}' (give "
                                  f"one of them a 'name')")
            names.append(name)
            if spec is not None:
                data[name] = spec
        object.__setattr__(self, "targets", tuple(names))
        object.__setattr__(self, "data", data)
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"config key 'shots': every shot count must be at least 1, got {list(self.shots)}")
        if (self.queries < 1 or self.episodes < 1 or self.val_episodes < 1 or self.feature_val_episodes < 1
                or not self.seeds or not self.targets):
            raise ConfigError("config keys 'queries', 'episodes', 'val_episodes', 'feature_val_episodes' must be at "
                              "least 1, and 'seeds' and 'targets' not empty")
        if not 0 <= self.tie_margin < 1:
            raise ConfigError(f"config key 'tie_margin' is an accuracy fraction in [0, 1), got {self.tie_margin}")
        if self.val_rule not in VAL_RULES:
            raise ConfigError(f"config key 'val_rule': '{self.val_rule}' is not one of {', '.join(VAL_RULES)}")
        if self.cpus_per_trial <= 0 or self.feature_cpus <= 0:
            raise ConfigError("config keys 'cpus_per_trial' and 'feature_cpus' must be positive")
        if self.val_split == self.test_split:
            raise ConfigError(f"config keys 'val_split' and 'test_split' are both '{self.test_split}': validation "
                              f"episodes must share no image with test episodes")
        check_labels(self.strategies)
        with_target_bn_stats = self._target_bn_stats()
        for name, src in self.data.items():
            src.check(f"data.{name}")
            searched = [e.name() for e in self.strategies if e.search]
            if src.split == "none" and name in self.targets and searched:
                raise ConfigError(
                    f"config key 'data.{name}.split' is none, so target '{name}' has no validation images; "
                    f"strategies {searched} search on validation episodes: use split: halves or drop the search")
            if src.split == "none" and name in self.targets and with_target_bn_stats:
                raise ConfigError(
                    f"config key 'data.{name}.split' is none, so target '{name}' has no unlabelled images apart "
                    f"from its test images; strategies {with_target_bn_stats} take bn_stats: target from "
                    f"them: use split: halves")
        stages = num_stages(self.backbone)
        for e in self.strategies:
            e.check(stages)

    def _target_bn_stats(self) -> list[str]:
        """The entries with ``bn_stats: target``."""
        return [e.name() for e in self.strategies if e.params.get("bn_stats") == "target"]

    def default_split(self) -> str:
        """A user's data without a split rule: halves when a strategy searches (its validation
        episodes need images the test episodes never see) or takes target statistics (from images
        the test episodes never see), else every image for test episodes."""
        return "halves" if any(e.search for e in self.strategies) or self._target_bn_stats() else "none"

    def spec(self, target: str) -> DataSpec | None:
        """The user's data of ``target`` with the defaults filled in (None: an embedded target)."""
        spec = self.data.get(target)
        return spec.with_defaults(input_size_of(self.backbone, self.input_size), self.default_split()) if spec else None

    def cells_dir(self, storage: "str | os.PathLike | Location") -> Location:
        return Location.of(storage) / "runs" / self.experiment / "cells"


@dataclass
class CompareResult:
    """What a comparison did and wrote; ``failures`` lists failed and unfinished cells by name."""

    grid: GridResult
    rows: int
    output: Path
    wall_s: float
    cells_dir: Path

    @property
    def failures(self) -> list[str]:
        return [f"{c.what}: {msg}" for c, msg in self.grid.failed] + [c.what for c in self.grid.unfinished]

    @property
    def exit_status(self) -> int:
        """``EXIT_INCOMPLETE``, ``EXIT_FAILED_CELLS`` or ``EXIT_OK`` (``tl.errors``)."""
        return grid_exit_status(len(self.grid.failed), len(self.grid.unfinished))


def _identity(plain: dict, entry: StrategyEntry, feature: bool, content: str) -> dict:
    """Everything besides (target, shots, seed, label) that changes a cell's rows; ``content``: the
    digest of the weights' content (``weights_content``), so weights that change bytes under the same
    name make new cells."""
    from tl.pretrain import weights_identity

    keep = {k: plain[k] for k in ("backbone", "input_size", "test_split", "val_split", "n_way", "queries", "episodes")}
    keep["weights"] = weights_identity(plain["weights"])  # the recipe a pretrained name stands for
    keep["weights_content"] = content
    # every cell is scored on validation episodes (the recommendation): a feature cell on its own number
    keep["val_episodes"] = plain["feature_val_episodes"] if feature else plain["val_episodes"]
    # rows 3: validation and selection episodes of their own streams, the pool handed by uses_pool,
    # and a deterministic cost per row
    keep["rows"] = 3
    if entry.search and plain["val_rule"] != "full":  # the full rule is the one cells were keyed without
        keep["val_rule"] = plain["val_rule"]
    if plain.get("data"):
        keep["data"] = plain["data"]  # a user's data (where, size, split: DataSpec.identity) changes every row
    return {**keep, "strategy": entry.strategy, "params": entry.params, "search": entry.search}


def weights_content(cfg: CompareConfig, weights: str | None) -> str:
    """The digest of the backbone's weights as built (``tl.models.weights_digest``), the identity of
    what a cell ran on: pretraining a name again, or a file rewritten in place, makes new cells.
    ``weights``: resolved (``resolve_weights``); None is random initialisation."""
    from tl.models import make_backbone, weights_digest

    if weights is None:
        return "random"
    return weights_digest(make_backbone(cfg.backbone, weights, cfg.input_size))


def _present_content(cfg: CompareConfig, storage: "str | os.PathLike | Location") -> str:
    """``weights_content`` of the weights as they are now, without pretraining anything: "missing"
    when a pretrained backbone is still to be made (none of its cells can have run)."""
    from tl.pretrain import is_pretrained, pretrained_weights_if_present

    if is_pretrained(cfg.weights):
        found = pretrained_weights_if_present(cfg.weights, cfg.backbone, storage)
        return "missing" if found is None else weights_content(cfg, found)
    return weights_content(cfg, None if cfg.weights in ("random", "none", "") else cfg.weights)


def cells(cfg: CompareConfig, gpu: float = 0.0, content: str = "unknown") -> list[Cell]:
    """Every cell of the comparison, with its identity, resources (``gpu``: the share of a trained
    cell, ``tl.runtime.gpu_share``; a feature cell classifies cached embeddings on its CPU) and
    relative cost. Resources are not part of a cell's identity; ``content`` (``weights_content``) is."""
    plain = to_dict(cfg)
    plain["data"] = {k: cfg.spec(k).identity() for k in cfg.data}
    out = []
    for e in cfg.strategies:
        strat = e.build()
        label, ident = e.name(), _identity(plain, e, strat.uses_embeddings, content)
        n_cands = len(e.candidates())
        cpu = cfg.feature_cpus if strat.uses_embeddings else cfg.cpus_per_trial
        for target in cfg.targets:
            for shots in cfg.shots:
                val = cfg.feature_val_episodes if strat.uses_embeddings else cfg.val_episodes
                episodes = cfg.episodes + val + (cfg.val_episodes * n_cands if n_cands > 1 else 0)
                for seed in cfg.seeds:
                    out.append(Cell.make(
                        (target, f"{shots}shot", f"seed{seed}", label), ident,
                        f"{target} {shots}-shot seed {seed} {label}",
                        {"target": target, "shots": shots, "seed": seed, "label": label, "entry": e.plain()},
                        cpu=cpu, gpu=0.0 if strat.uses_embeddings else gpu,
                        cost=episodes * strat.episode_cost(shots), cheap=strat.uses_embeddings))
    return out


def target_data(cfg: CompareConfig, target: str) -> dict:
    """A target's test and validation parts; a user's folder, manifest or Parquet held as files
    (``ImageSet.lazy``): the driver holds its labels and paths (or row places), each episode decodes
    its own images in its trial."""
    return load_target(target, cfg.spec(target), cfg.test_split, cfg.val_split, lazy=True)


def prepare(cfg: CompareConfig, todo: list[Cell], weights: str | None, storage: "str | os.PathLike | Location",
            log: Callable[[str], None] = print) -> dict:
    """What every cell function shares (``{"inputs": CellInputs}``, ``tl.evaluate.cell``): target
    splits; for the targets whose todo cells ask for ``bn_stats: target``, the target-statistics
    weights (re-estimated on the target's unlabelled `val_split` images, never a test image) and, for
    the validation episodes, the same estimated without each validation fold (so a validation
    episode's queries are never among the images its statistics came from); cached embeddings under
    the statistics each feature cell uses; and the episode settings."""
    from tl.embeddings import EmbedConfig, extract, fold_bn_stats, target_bn_stats

    cache = Location.of(storage) / "cache"
    targets = sorted({c.spec["target"] for c in todo})
    data = {t: target_data(cfg, t) for t in targets}
    built = [(c.spec["target"], StrategyEntry(**c.spec["entry"]).build()) for c in todo]
    target_weights: dict = {}
    fold_weights: dict = {}
    t0 = time.time()
    for t in sorted({t for t, s in built if s.bn_stats_at_start == "target"}):
        val = data[t]["val"]
        if val is None:
            raise ConfigError(f"bn_stats: target needs unlabelled images of target '{t}', and it has no "
                              f"'{cfg.val_split}' split (split none): use split halves")
        # said in one line below, not one per file
        target_weights[t] = target_bn_stats(cfg.backbone, weights, cfg.input_size, val, cache, lambda _: None)
        fold_weights[t] = fold_bn_stats(cfg.backbone, weights, cfg.input_size, val, cache, lambda _: None)
    embeddings: dict = {}
    made: list = []
    for t, bn in sorted({(t, s.bn_stats) for t, s in built if s.uses_embeddings}):
        def vectors(w: str | None, split: str):
            ecfg = EmbedConfig.on_cluster(backbone=cfg.backbone, weights=w, input_size=cfg.input_size,
                                          cpus_per_actor=min(1.0, cfg.cpus_per_trial))
            emb = extract(data[t][split], ecfg, cache, lambda _: None)
            made.append(emb)
            return emb.vectors

        if bn == "source":
            embeddings.setdefault(t, {})[bn] = {s: vectors(weights, s) for s in ("test", "val")
                                                if data[t][s] is not None}
        else:
            embeddings.setdefault(t, {})[bn] = {"test": vectors(target_weights[t], "test"),
                                                "val": {f: vectors(w, "val") for f, w in fold_weights[t].items()}}
    if made or target_weights:  # one line, not one per file: the details are in the returned objects
        hits = sum(e.hit for e in made)
        log("[prepare] " + (f"target BatchNorm statistics of {', '.join(sorted(target_weights))} (and without each "
                            "validation fold); " if target_weights else "")
            + f"{len(made)} embedding sets ({len(made) - hits} extracted, {hits} from the cache) in "
            f"{time.time() - t0:.1f} s -> {cache}")
    settings = EpisodeSettings(backbone=cfg.backbone, input_size=cfg.input_size, queries=cfg.queries,
                               n_way=cfg.n_way, episodes=cfg.episodes, val_episodes=cfg.val_episodes,
                               feature_val_episodes=cfg.feature_val_episodes, val_rule=cfg.val_rule)
    return {"inputs": CellInputs(data=data, settings=settings, weights=weights, embeddings=embeddings,
                                 target_weights=target_weights, fold_weights=fold_weights)}


def dry_run(cfg: CompareConfig, storage: "str | os.PathLike | Location", log: Callable[[str], None] = print,
            retry_failed: bool = False) -> dict:
    """Say what a run would do (trials, episodes, estimated wall time) and run nothing: no Ray, no
    pretraining, no output folder."""
    from tl.cost import estimate

    p = plan(cells(cfg, content=_present_content(cfg, storage)), CellStore(cfg.cells_dir(storage)), retry_failed)
    for t in cfg.targets:
        check_target(target_data(cfg, t), t, max(cfg.shots))
    est = estimate(cfg, p["todo"])
    log(f"[dry-run] {len(p['todo'])} trials to run of {len(p['todo']) + len(p['done']) + len(p['failed'])} cells "
        f"({len(p['done'])} finished, {len(p['failed'])} failed before); {est['test_episodes']} test episodes and "
        f"{est['val_episodes']} validation episodes; about {est['core_seconds'] / 60:.1f} core-minutes of training, "
        f"estimated wall time {est['wall_s'] / 60:.1f} min on {est['cores']} cores (from timed training steps on "
        f"this machine; pretraining, if the backbone is missing, adds about 1.5 min)")
    return {**est, "plan": p}


def run_compare(cfg: CompareConfig, storage: "str | os.PathLike | Location", output: Path,
                log: Callable[[str], None] = print, retry_failed: bool = False) -> CompareResult:
    """Run every missing cell as a Tune trial, then write rows.parquet, summary.md, summary.csv,
    accuracy_vs_shots.png and best.yaml to the local folder ``output`` (a workflow stages a URI's
    outputs there, ``Location.staged``); ``storage`` may be a local path or a URI."""
    from tl.pretrain import resolve_weights

    t0 = time.time()
    storage = Location.of(storage)
    check_shared_storage(storage)  # on several nodes, a folder one of them cannot see stops here
    store = CellStore(cfg.cells_dir(storage))
    gpu = gpu_share(cfg.gpu_per_trial, cluster_gpus())
    # a first plan with the weights as they are now (weights still to be pretrained: every cell to run)
    p = plan(cells(cfg, gpu, _present_content(cfg, storage)), store, retry_failed)
    for t in cfg.targets:  # bad data stops here, before any pretraining or trial
        parts = target_data(cfg, t)
        check_target(parts, t, max(cfg.shots))
        if p["todo"]:
            check_files_of(parts)
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    # weights that do not fit stop here, once; their content is every cell's identity
    grid = cells(cfg, gpu, weights_content(cfg, weights))
    p = plan(grid, store, retry_failed)
    log(f"[compare] {len(grid)} cells ({len(cfg.targets)} targets x {len(cfg.shots)} shots x {len(cfg.seeds)} seeds x "
        f"{len(cfg.strategies)} strategies), {cfg.episodes} test episodes each; {len(p['done'])} finished and "
        f"{len(p['failed'])} failed before (in {store.root}); {len(p['todo'])} to run"
        + (f"; trained cells take {gpu:g} GPU each, in mixed precision (bf16 where the GPU has it, else fp16)"
           if gpu else ""))
    output.mkdir(parents=True, exist_ok=True)  # once the data and the weights are checked
    if cfg.recommend:  # the prediction is made before any cell runs, and recorded beside the outcome
        from tl.recommend import for_comparison

        (output / "recommend.yaml").write_text(yaml.safe_dump(for_comparison(cfg, weights, storage, log),
                                                              sort_keys=False))
    shared = prepare(cfg, p["todo"], weights, storage, log) if p["todo"] else {}

    def first_answers(partial: GridResult) -> None:  # the feature cells' answers, while trained cells run
        if partial.done:
            write_outputs(cfg, partial, store, output, weights, lambda _: None, interim=True)
            log(f"[compare] the feature cells' results are in {output / 'summary.md'}; the trained cells follow "
                f"({len(partial.unfinished)} to run)")

    result = run_cells(grid, store, run_cell, shared=shared, what="compare", storage=storage, log=log,
                       retry_failed=retry_failed, max_concurrent=cfg.max_concurrent, max_failures=cfg.max_failures,
                       experiment=cfg.experiment, mlflow=cfg.mlflow, after_cheap=first_answers)
    return write_outputs(cfg, result, store, output, weights, log, t0)


def write_outputs(cfg: CompareConfig, result: GridResult, store: CellStore, output: Path, weights: str | None,
                  log: Callable[[str], None] = print, t0: float | None = None, interim: bool = False) -> CompareResult:
    """Gather the finished cells of this config into the outputs (and list failed cells). ``interim``:
    the reports a person reads while the rest runs (summary.md, marked incomplete at its top, and the
    plots), without rows.parquet and best.yaml, which only a finished pass writes: a run killed
    after it leaves no complete-looking result."""
    from tl.report import best_entries, describe, per_class_report, write_best, write_config, write_reports

    failures = [f"{c.what}: {msg}" for c, msg in result.failed]
    unfinished = [c.what for c in result.unfinished]
    rows = result.rows(store)
    if rows.empty:
        raise TrainingError("no cell finished:\n" + "\n".join(failures + unfinished))
    plain = to_dict(cfg)
    rows = stamp(rows, plain).sort_values(["target", "shots", "seed", "strategy", "episode"]).reset_index(drop=True)
    searched = [e.name() for e in cfg.strategies if e.search]
    rule = " by successive halving" if cfg.val_rule == "halving" else ""
    chosen_on = (f", except {', '.join(searched)}, whose searched keys were chosen per cell{rule} on "
                 f"{cfg.val_episodes} selection episodes of the `{cfg.val_split}` split (no image shared with the "
                 f"test episodes, and not the validation episodes the recommendation is made on)" if searched else "")
    note = describe(plain, cfg.test_split, rows, weights, chosen_on)
    chosen = rows.groupby(["target", "shots", "strategy"])["chosen"].first()
    chosen = chosen[chosen != "{}"]
    if len(chosen):
        note += "\n\nChosen on selection episodes: " + "; ".join(
            f"{s} {t} {k}-shot: {v}" for (t, k, s), v in chosen.items()) + "."
    short = rows[rows["short_classes"].fillna("{}") != "{}"] if "short_classes" in rows else rows.iloc[:0]
    for (t, k), g in short.groupby(["target", "shots"]):
        counts = json.loads(g["short_classes"].iloc[0])
        note += (f"\n\nSmall-data mode, {t} {k}-shot: these classes have fewer than {k} + {cfg.queries} images, so "
                 f"every image left after the shots is a query: effective queries per class "
                 + ", ".join(f"{c}: {n}" for c, n in counts.items()) + f" (others: {cfg.queries}).")
    if failures:
        note += "\n\nFAILED cells:\n" + "\n".join(f"- {f}" for f in failures)
    if unfinished:
        note = (f"**INCOMPLETE: {len(unfinished)} of {len(result.cells)} cells have not finished** (rerun the same "
                f"command, or with --resume, to finish them; finished cells are kept): "
                + ", ".join(unfinished) + ".\n\n" + note)
    summary, choices = write_reports(rows, output, note, f"{cfg.backbone}: {cfg.episodes} test episodes x "
                                     f"{len(cfg.seeds)} seed(s), {cfg.queries} queries/class", rows_file=not interim)
    write_config(output, plain)
    entries = {e.name(): e for e in cfg.strategies}
    best = best_entries(summary, rows, entries, choices)
    per_class = per_class_report(rows, best, {t: target_data(cfg, t)["test"].classes for t in best}, output)
    with open(output / "summary.md", "a") as f:
        f.write("\n" + per_class)
        if (output / "recommend.yaml").is_file():
            from tl.recommend import outcome_markdown

            families = {label: e.build().family for label, e in entries.items()}
            f.write("\n" + outcome_markdown(yaml.safe_load((output / "recommend.yaml").read_text()) or [], summary,
                                            families, best))
    if unfinished:  # said first, above the recommendation a reader looks at
        text = (output / "summary.md").read_text()
        (output / "summary.md").write_text(
            f"**INCOMPLETE: {len(unfinished)} of {len(result.cells)} cells have not finished"
            + (" (they are running now)" if interim else "") + "; this summary shows the finished ones.**\n\n" + text)
    if interim:
        return CompareResult(grid=result, rows=len(rows), output=output, wall_s=float("nan"), cells_dir=store.root)
    write_best(output / "best.yaml", cfg, weights, best, "recommended per target and shots: chosen on validation "
               f"episodes of the `{cfg.val_split}` split (the cheapest of the strategies practically equivalent there, "
               f"within ±{100 * cfg.tie_margin:g} points, to the validation winner), its accuracy measured on the test "
               "episodes", incomplete=unfinished)
    wall = time.time() - t0 if t0 else float("nan")
    log(f"[compare] {len(rows)} rows; summary in {output / 'summary.md'}; best in {output / 'best.yaml'} ({wall:.0f} s)")
    if failures:
        log("[compare] FAILED cells (rerun with --retry-failed after fixing them):\n" + "\n".join(f"  {f}" for f in failures))
    if unfinished:
        log(f"[compare] INCOMPLETE: {len(unfinished)} cells did not finish; run the same command again (or --resume)")
    return CompareResult(grid=result, rows=len(rows), output=output, wall_s=wall, cells_dir=store.root)
