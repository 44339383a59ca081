"""The one engine for every grid of cells: comparison cells, a search's test phase, the
fixed-hyper-parameter tables and the adaptation benchmark's runs.

A cell has an identity (its file name: readable parts and a hash of everything else that changes
its rows) and the resources its trial asks for. The cell store keeps each finished cell as one
Parquet file and each failed one as a ``.failed.json`` with its message, written atomically, so a
run that is interrupted loses only unfinished cells and running the same grid again *is*
resuming. The todo cells run as Ray Tune trials (one trial per cell, longest first, so no core
idles at the tail); a trial that crashes with an error that is not a ``TLError`` is retried by
Tune, then recorded as failed with its exception.
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
from tl.runtime import hardware, data_progress
from tl.storage import Location

CellFn = Callable[..., "tuple[pd.DataFrame, str]"]


@dataclass(frozen=True)
class Cell:
    """``parts``: the readable identity (target, shots, ...); ``ident``: hashes everything else;
    ``spec``: what the cell function needs (JSON); ``cost``: relative, to start long cells first."""

    parts: tuple[str, ...]
    ident: str
    what: str
    spec: dict[str, Any] = field(default_factory=dict)
    cpu: float = 1.0
    gpu: float = 0.0
    cost: float = 0.0

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


def _trial(config: dict, *, fn: CellFn, root: str, shared: dict) -> None:
    """One cell as a Tune trial: its rows reach the store before the trial reports."""
    import ray
    import torch

    torch.set_num_threads(1)  # one core per trial: trials are the parallel axis
    data_progress()
    cell = Cell.from_plain(config["cell"])
    store = CellStore(root)
    t0 = time.time()
    try:
        rows, line = fn(cell.spec, **shared)
    except TLError as exc:  # a diverging cell is a recorded result, not a crash for Tune to retry
        msg = f"{type(exc).__name__}: {exc}"
        store.fail(cell, msg)
        tune.report({"failed": msg, "progress_line": f"{cell.what}: FAILED {msg}"})
        return
    rows["cell_seconds"] = time.time() - t0
    rows["node"], rows["host"] = ray.get_runtime_context().get_node_id(), platform.node()
    rows["hardware"] = json.dumps(hardware(), sort_keys=True)  # the node's that ran the cell, not the driver's
    store.save(cell, rows)
    # numbers for Tune's loggers (TensorBoard, CSV, MLflow): the cell's means of what it measured
    numbers = {k: float(rows[k].mean()) for k in REPORTED if k in rows and pd.api.types.is_numeric_dtype(rows[k])}
    tune.report({"failed": "", "progress_line": f"{cell.what}: {line}", **numbers})


def run_cells(cells: list[Cell], store: CellStore, fn: CellFn, *, shared: dict, what: str,
              storage: "str | os.PathLike | Location",
              log: Callable[[str], None] = print, retry_failed: bool = False, max_concurrent: int = 0,
              max_failures: int = 2, experiment: str | None = None, mlflow: str = "") -> GridResult:
    """Run the todo cells of ``cells`` as Tune trials (``fn(spec, **shared) -> (rows, line)``);
    return what is finished, failed and unfinished afterwards. The Tune experiment is named
    ``<experiment>-<time>`` under ``<storage>/tune`` (``what``, the progress prefix, by default);
    ``mlflow``: a tracking URI that also gets every trial as a run (``tracking_callbacks``)."""
    p = plan(cells, store, retry_failed)
    todo = p["todo"]
    if todo:
        by_name = {c.name: c for c in todo}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, fn=fn, root=str(store.root), shared=shared),
            lambda config: {"cpu": config["cell"]["cpu"], "gpu": config["cell"]["gpu"]})
        tuner = tune.Tuner(
            trainable, param_space={"cell": tune.grid_search([_plain(c) for c in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{experiment or what}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      **(Location.of(storage) / "tune").ray_storage(),
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=[TrialProgress(log, len(todo), what),
                                                 *tracking_callbacks(mlflow, experiment or what)]))
        for res in tuner.fit():
            if res.error is not None:  # a crash (a bug, out of memory) after Tune's retries: keep its exception
                cell = by_name[Cell.from_plain(res.config["cell"]).name]
                err = getattr(res.error, "cause", None)  # a RayTaskError wraps the trial's own exception
                err = err if isinstance(err, BaseException) else res.error
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                store.fail(cell, f"crashed: {type(err).__name__}: {lines[-1] if lines else ''}")
    after = plan(cells, store)
    return GridResult(cells=list(cells), done=after["done"],
                      failed=[(c, store.error(c)) for c in after["failed"]], unfinished=after["todo"],
                      ran=len(todo), skipped=len(p["done"]))


def tracking_callbacks(uri: str, experiment: str) -> list:
    """Ray Tune's own MLflow logger when ``uri`` is set (the ``mlflow`` extra): each trial becomes a
    run of MLflow experiment ``experiment`` with the cell's config as parameters and the numbers it
    reported (``REPORTED``) as metrics. A local folder (or ``file:`` URI) is MLflow's file store,
    which MLflow 3 keeps only behind ``MLFLOW_ALLOW_FILE_STORE``: tl sets it for that case."""
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


class TrialProgress(tune.Callback):
    """One line per finished trial (``done/total``, its ``progress_line``, seconds so far). Tune
    pickles its run config, so this holds a key to the logger, not the logger itself."""

    def __init__(self, log: Callable[[str], None], total: int | None, what: str,
                 describe: Callable[[dict], str] | None = None):
        _LOGGERS[id(log)] = log
        self.key, self.total, self.what, self.done, self.t0 = id(log), total, what, 0, time.time()
        self.describe = describe

    def _say(self, line: str) -> None:
        _LOGGERS.get(self.key, print)(f"[{self.what}] {line}")

    def _name(self, trial) -> str:
        cell = trial.config.get("cell")
        if cell:
            return cell["what"]
        return self.describe(trial.config) if self.describe else str(trial.config)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        line = r.get("progress_line") or self._name(trial)
        if "val_accuracy" in r and "progress_line" not in r:
            line += f": validation {100 * r['val_accuracy']:.1f}% at {r.get('steps')} steps"
        self._say(f"{self.done}/{self.total or '?'} {line} ({time.time() - self.t0:.0f} s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._say(f"{self.done}/{self.total or '?'} trial {trial.trial_id} ERROR ({self._name(trial)}), no retries "
                  f"left ({time.time() - self.t0:.0f} s)")

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
