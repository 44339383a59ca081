"""The one engine for every grid of cells: comparison cells, a search's test phase, the
fixed-hyper-parameter tables and the adaptation benchmark's runs.

A cell has an identity (its file name: readable parts and a hash of everything else that changes
its rows) and the resources its trial asks for. The cell store keeps each finished cell as one
Parquet file and each failed one as a ``.failed.json`` with its message, written atomically, so a
run that is interrupted loses only unfinished cells and running the same grid again *is*
resuming. The todo cells run as Ray Tune trials: cheap cells (``Cell.cheap``: a feature
classifier's, milliseconds an episode) first, many to a trial, so their answers come within
seconds and a thousand of them do not pay a thousand trial starts; then the others, one trial
each, longest first, so no core idles at the tail. A trial that crashes with an error that is not
a ``TLError`` is retried by Tune (the cells it finished are kept), then its unfinished cells are
recorded as failed with its exception.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray import tune

from tl.config import config_hash
from tl.errors import ConfigError, TLError
from tl.runtime import assigned_cpus, assigned_threads, check_shared_storage, data_progress, hardware
from tl.storage import Location

CellFn = Callable[..., "tuple[pd.DataFrame, str]"]


@dataclass(frozen=True)
class Cell:
    """``parts``: the readable identity (target, shots, ...); ``ident``: hashes everything else;
    ``spec``: what the cell function needs (JSON); ``cost``: relative, to start long cells first;
    ``cheap``: run in the first phase, many to a trial (neither is part of the identity)."""

    parts: tuple[str, ...]
    ident: str
    what: str
    spec: dict[str, Any] = field(default_factory=dict)
    cpu: float = 1.0
    gpu: float = 0.0
    cost: float = 0.0
    cheap: bool = False

    @property
    def name(self) -> str:
        return "__".join(p.replace(":", "_").replace("/", "_") for p in self.parts) + "__" + self.ident

    @staticmethod
    def from_plain(d: dict) -> "Cell":
        return Cell(**{**d, "parts": tuple(d["parts"])})

    @staticmethod
    def make(parts: tuple[str, ...], identity: dict, what: str, spec: dict, **kw) -> "Cell":
        return Cell(tuple(parts), config_hash(identity, 10), what, spec, **kw)


class CellStore:
    """Finished and failed cells under one folder (shared storage on a cluster)."""

    def __init__(self, root: "str | os.PathLike | Location"):
        self.root = Location.of(root)

    def _path(self, cell: Cell, suffix: str) -> Location:
        return self.root / (cell.name + suffix)

    def statuses(self, cells: list[Cell]) -> list[str]:
        """``done``, ``failed`` or ``todo`` for each cell, from one listing of the folder (one request
        on an object store)."""
        names = {loc.name for loc in self.root.iterdir()}
        return ["done" if c.name + ".parquet" in names else "failed" if c.name + ".failed.json" in names else "todo"
                for c in cells]

    def save(self, cell: Cell, rows: pd.DataFrame) -> None:
        import io

        buf = io.BytesIO()
        rows.to_parquet(buf)
        self._path(cell, ".parquet").write_bytes(buf.getvalue())
        self._path(cell, ".failed.json").unlink(missing_ok=True)

    def fail(self, cell: Cell, message: str) -> None:
        self._path(cell, ".failed.json").write_bytes(
            json.dumps({"cell": list(cell.parts), "what": cell.what, "error": message}).encode())

    def load(self, cell: Cell) -> pd.DataFrame:
        import io

        return pd.read_parquet(io.BytesIO(self._path(cell, ".parquet").read_bytes()))

    def error(self, cell: Cell) -> str:
        return json.loads(self._path(cell, ".failed.json").read_text())["error"]


@dataclass
class GridResult:
    """What one pass over a grid did: ``ran`` trials started now, ``skipped`` cells finished before,
    ``failed`` (cell, message) pairs (this time or before), ``unfinished`` cells (interrupted)."""

    cells: list[Cell]
    done: list[Cell]
    failed: list[tuple[Cell, str]]
    unfinished: list[Cell]
    ran: int = 0
    skipped: int = 0

    def rows(self, store: CellStore) -> pd.DataFrame:
        parts = [store.load(c) for c in self.done]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plan(cells: list[Cell], store: CellStore, retry_failed: bool = False) -> dict[str, list[Cell]]:
    """Which cells are finished, failed before (kept unless ``retry_failed``) or still to run."""
    out: dict[str, list[Cell]] = {"done": [], "failed": [], "todo": []}
    for c, s in zip(cells, store.statuses(cells)):
        out["todo" if s == "failed" and retry_failed else s].append(c)
    out["todo"].sort(key=lambda c: c.cost, reverse=True)
    return out


REPORTED = ("accuracy", "val_accuracy", "seconds", "cell_seconds")

#: the most cheap cells one trial runs: a trial's start (a second or two) shared by this many cells
#: (``python -m benchmarks.grid``: 64 left about 30 ms of trial starts per cell)
CELLS_PER_TRIAL = 256


def bundles(cells: list[Cell], slots: int) -> list[list[Cell]]:
    """``cells`` dealt into trials: at least ``slots`` (the cores that can run them at once) where
    there are that many cells, each of at most ``CELLS_PER_TRIAL``, dealt by decreasing cost so the
    trials take about as long."""
    if not cells:
        return []
    n = min(len(cells), max(1, slots, -(-len(cells) // CELLS_PER_TRIAL)))
    out: list[list[Cell]] = [[] for _ in range(n)]
    for i, c in enumerate(sorted(cells, key=lambda c: c.cost, reverse=True)):
        out[i % n].append(c)
    return out


def _trial(config: dict, *, fn: CellFn, root: str, shared: dict) -> None:
    """One trial's cells (``config["cells"]``), one after another; each one's rows reach the store
    before the trial reports it (one report per cell). Cells finished before (by a previous attempt
    of this trial, which Tune retries after a crash) are skipped."""
    import ray

    threads, cpus = assigned_threads(), assigned_cpus()  # what Ray assigned the trial, on its node
    data_progress()
    store = CellStore(root)
    cells = [Cell.from_plain(c) for c in config["cells"]]
    statuses = store.statuses(cells) if len(cells) > 1 else ["todo"]
    for cell, status in zip(cells, statuses):
        if status == "done":
            continue
        t0 = time.time()
        try:
            rows, line = fn(cell.spec, **shared)
        except TLError as exc:  # a diverging cell is a recorded result, not a crash for Tune to retry
            msg = f"{type(exc).__name__}: {exc}"
            store.fail(cell, msg)
            tune.report({"failed": msg, "cell": cell.name, "cost": cell.cost,
                         "progress_line": f"{cell.what}: FAILED {msg}"})
            continue
        t1 = time.time()
        rows["cell_seconds"] = t1 - t0
        rows["cell_started"], rows["cell_finished"] = t0, t1  # when, so phases can be checked from the rows
        rows["node"], rows["host"] = ray.get_runtime_context().get_node_id(), platform.node()
        rows["threads"], rows["trial_cpus"] = threads, cpus
        rows["hardware"] = json.dumps(hardware(), sort_keys=True)  # the node's that ran the cell, not the driver's
        store.save(cell, rows)
        # numbers for Tune's loggers (TensorBoard, CSV, MLflow): the cell's means of what it measured
        numbers = {k: float(rows[k].mean()) for k in REPORTED if k in rows and pd.api.types.is_numeric_dtype(rows[k])}
        tune.report({"failed": "", "cell": cell.name, "cost": cell.cost, "progress_line": f"{cell.what}: {line}",
                     **numbers})


def _slots(cells: list[Cell]) -> int:
    """How many of ``cells`` the running Ray can run at once (its CPUs over a cell's)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    return max(1, int(cpus // max(min(c.cpu for c in cells), 1.0)))


def run_cells(cells: list[Cell], store: CellStore, fn: CellFn, *, shared: dict, what: str,
              storage: "str | os.PathLike | Location",
              log: Callable[[str], None] = print, retry_failed: bool = False, max_concurrent: int = 0,
              max_failures: int = 2, experiment: str | None = None, mlflow: str = "",
              after_cheap: Callable[["GridResult"], None] | None = None) -> GridResult:
    """Run the todo cells of ``cells`` as Tune trials (``fn(spec, **shared) -> (rows, line)``);
    return what is finished, failed and unfinished afterwards. Cheap cells run first, many to a
    trial (``bundles``), then ``after_cheap`` gets the grid as it stands (a comparison writes its
    reports: an interrupted run shows what it has); the others follow, one trial each. The Tune
    experiments are named ``<experiment>-<time>`` under ``<storage>/tune`` (``what``, the progress
    prefix, by default); ``mlflow``: a tracking URI that also gets every trial as a run
    (``tracking_callbacks``)."""
    p = plan(cells, store, retry_failed)
    todo = p["todo"]
    name = f"{experiment or what}-{time.strftime('%Y%m%d-%H%M%S')}"
    progress = Progress(log, what, todo)
    cheap = [c for c in todo if c.cheap]
    costly = [c for c in todo if not c.cheap]
    phases = [(bundles(cheap, _slots(cheap)) if cheap else [], f"{name}-cheap" if costly else name),
              ([[c] for c in costly], name)]
    if todo:
        log(f"[{what}] trials' results for TensorBoard: tensorboard --logdir {Location.of(storage) / 'tune'}")
    for i, (trials, tune_name) in enumerate(phases):
        if not trials:
            continue
        _fit(trials, store, fn, shared=shared, storage=storage, name=tune_name, progress=progress,
             max_concurrent=max_concurrent, max_failures=max_failures, mlflow=mlflow, experiment=experiment or what)
        progress.flush()
        if i == 0 and costly and after_cheap is not None:
            after_cheap(_result(cells, store, p))
    return _result(cells, store, p)


def _result(cells: list[Cell], store: CellStore, before: dict[str, list[Cell]]) -> GridResult:
    after = plan(cells, store)
    return GridResult(cells=list(cells), done=after["done"],
                      failed=[(c, store.error(c)) for c in after["failed"]], unfinished=after["todo"],
                      ran=len(before["todo"]), skipped=len(before["done"]))


def _fit(trials: list[list[Cell]], store: CellStore, fn: CellFn, *, shared: dict,
         storage: "str | os.PathLike | Location", name: str, progress: "Progress", max_concurrent: int,
         max_failures: int, mlflow: str, experiment: str) -> None:
    """One Tune experiment, a trial per list of cells; a trial that still crashes after Tune's
    retries leaves its unfinished cells failed with its exception."""
    check_shared_storage(storage)  # before any trial: every node must see the cells' folder
    trainable = tune.with_resources(
        tune.with_parameters(_trial, fn=fn, root=str(store.root), shared=shared),
        lambda config: {"cpu": max(c["cpu"] for c in config["cells"]), "gpu": max(c["gpu"] for c in config["cells"])})
    tuner = tune.Tuner(
        trainable, param_space={"cells": tune.grid_search([[_plain(c) for c in t] for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None, reuse_actors=True),
        run_config=tune.RunConfig(name=name, **(Location.of(storage) / "tune").ray_storage(),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=max_failures),
                                  callbacks=[TrialProgress(progress.log, None, progress.what, progress=progress),
                                             *tracking_callbacks(mlflow, experiment)]))
    with quiet_tune():
        results = tuner.fit()
    for res in results:
        if res.error is not None:  # a crash (a bug, out of memory) after Tune's retries: keep its exception
            err = getattr(res.error, "cause", None)  # a RayTaskError wraps the trial's own exception
            err = err if isinstance(err, BaseException) else res.error
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            cells = [Cell.from_plain(c) for c in res.config["cells"]]
            for cell, status in zip(cells, store.statuses(cells)):
                if status == "todo":
                    store.fail(cell, f"crashed: {type(err).__name__}: {lines[-1] if lines else ''}")


class quiet_tune:
    """Tune's own console output off for one ``fit`` (its experiment box and a TensorBoard hint that
    points at Ray's session folder, printed whatever ``verbose`` says by its newer output engine):
    tl prints one line per finished cell and the true TensorBoard folder."""

    def __enter__(self):
        self.before = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter, which verbose=0 silences

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = self.before


def tracking_callbacks(uri: str, experiment: str) -> list:
    """Ray Tune's own MLflow logger when ``uri`` is set (the ``mlflow`` extra): each trial becomes a
    run of MLflow experiment ``experiment`` with the cell's config as parameters and the numbers it
    reported (``REPORTED``) as metrics. A local folder (or ``file:`` URI) is MLflow's file store,
    which MLflow 3 keeps only behind ``MLFLOW_ALLOW_FILE_STORE``: tl sets it for that case. A trial
    of several cheap cells is one run whose numbers have one step per cell."""
    if not uri:
        return []
    try:
        import mlflow  # noqa: F401
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError as exc:
        raise ConfigError(f"config key 'mlflow' is {uri!r} but MLflow is not installed: pip install -e '.[mlflow]'") \
            from exc
    if "://" not in uri or uri.startswith("file:"):
        uri = Path(uri.removeprefix("file://").removeprefix("file:")).resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)]


def _plain(cell: Cell) -> dict:
    d = asdict(cell)
    d["parts"] = list(cell.parts)
    return d


_LOGGERS: dict[int, Callable[[str], None]] = {}
_PROGRESS: dict[int, "Progress"] = {}


#: cheap cells' results share a console line: this many at most, or those of the last few seconds
CHEAP_PER_LINE, CHEAP_LINE_S = 6, 5.0


class Progress:
    """A grid's progress over its phases: cells done of the todo, and a time left from the cost
    model (``Cell.cost``) at the rate measured so far on cells of the same kind (cheap or not).
    A costly cell gets a line of its own; cheap ones share lines (``CHEAP_PER_LINE``), so a
    thousand of them do not flood the console."""

    def __init__(self, log: Callable[[str], None], what: str, todo: list[Cell]):
        _LOGGERS[id(log)] = log
        _PROGRESS[id(self)] = self
        self.key, self.what, self.total, self.t0 = id(log), what, len(todo), time.time()
        self.kind = {c.name: c.cheap for c in todo}
        self.cost = {c.name: c.cost for c in todo}
        self.left = {k: sum(c.cost for c in todo if c.cheap == k) for k in (True, False)}
        self.spent = {True: [0.0, 0.0], False: [0.0, 0.0]}  # cost done, seconds of that kind's phase
        self.phase_t0: dict[bool, float] = {}
        self.seen: set[str] = set()
        self.pending: list[str] = []
        self.last_line = time.time()

    @property
    def log(self) -> Callable[[str], None]:
        return _LOGGERS.get(self.key, print)

    def finished(self, name: str, line: str) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        kind = self.kind.get(name, False)
        start = self.phase_t0.get(kind, self.t0)
        self.left[kind] -= self.cost.get(name, 0.0)
        self.spent[kind] = [self.spent[kind][0] + self.cost.get(name, 0.0), time.time() - start]
        self.pending.append(line)
        if not kind or len(self.pending) >= CHEAP_PER_LINE or time.time() - self.last_line >= CHEAP_LINE_S:
            self.flush()

    def flush(self) -> None:
        """The line of the results not yet shown (at a phase's end, and as they come)."""
        if self.pending:
            self.log(f"[{self.what}] {len(self.seen)}/{self.total} {'; '.join(self.pending)} "
                     f"({time.time() - self.t0:.0f} s{self._eta()})")
            self.pending, self.last_line = [], time.time()

    def start_phase(self, cheap: bool) -> None:
        self.phase_t0.setdefault(cheap, time.time())

    def _eta(self) -> str:
        left = 0.0
        for kind in (True, False):
            if self.left[kind] <= 1e-12:
                continue
            cost, seconds = self.spent[kind]
            if cost <= 0:
                return ""  # no cell of that kind finished yet: no rate to say it with
            left += self.left[kind] * seconds / cost
        return f", about {left:.0f} s left" if left > 0 else ""


class TrialProgress(tune.Callback):
    """One line per finished cell (``done/total``, its ``progress_line``, seconds so far and left,
    ``Progress``), or per finished trial where trials report no cell (a search's candidates). Tune
    pickles its run config, so this holds keys to the logger and the progress, not the objects."""

    def __init__(self, log: Callable[[str], None], total: int | None, what: str,
                 describe: Callable[[dict], str] | None = None, progress: Progress | None = None):
        _LOGGERS[id(log)] = log
        self.key, self.total, self.what, self.done, self.t0 = id(log), total, what, 0, time.time()
        self.describe, self.progress_key = describe, None if progress is None else id(progress)

    @property
    def progress(self) -> Progress | None:
        return None if self.progress_key is None else _PROGRESS.get(self.progress_key)

    def _say(self, line: str) -> None:
        _LOGGERS.get(self.key, print)(f"[{self.what}] {line}")

    def _name(self, trial) -> str:
        cells = trial.config.get("cells")
        if cells:
            return ", ".join(c["what"] for c in cells)
        return self.describe(trial.config) if self.describe else str(trial.config)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.progress is not None and trial.config.get("cells"):
            self.progress.start_phase(bool(trial.config["cells"][0].get("cheap")))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.progress is not None and result.get("cell"):
            self.progress.finished(result["cell"], result.get("progress_line") or result["cell"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.config.get("cells"):
            return  # each of its cells had its line when it reported
        self.done += 1
        r = trial.last_result or {}
        line = r.get("progress_line") or self._name(trial)
        if "val_accuracy" in r and "progress_line" not in r:
            line += f": validation {100 * r['val_accuracy']:.1f}% at {r.get('steps')} steps"
        self._say(f"{self.done}/{self.total or '?'} {line} ({time.time() - self.t0:.0f} s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._say(f"trial {trial.trial_id} ERROR ({self._name(trial)}), no retries left "
                  f"({time.time() - self.t0:.0f} s)")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(f"trial {trial.trial_id} lost ({self._name(trial)}); Tune retries it")


def stamp(rows: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Provenance on every row: the resolved config, git commit, package versions, and the hardware
    (kept from the trial that ran the cell when it recorded its own)."""
    from tl.runtime import provenance

    prov = provenance()
    rows["config"] = json.dumps(config, sort_keys=True)
    rows["git_commit"] = prov["git_commit"]
    rows["versions"] = json.dumps(prov["versions"], sort_keys=True)
    driver = json.dumps(prov["hardware"], sort_keys=True)
    rows["hardware"] = rows["hardware"].fillna(driver) if "hardware" in rows else driver
    return rows
