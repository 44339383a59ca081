"""The grid engine on real Ray Tune: the store's done / failed / todo, a failure's message kept and
not retried unless asked, a crash (not a TLError) recorded with its exception, finished cells never
run twice."""

import sys
from pathlib import Path

import pandas as pd
import pytest

from tl.errors import TrainingError
from tl.grid import Cell, CellStore, plan, run_cells


def _cell_fn(spec: dict, flags: str) -> tuple[pd.DataFrame, str]:
    """Fails (a TLError) while its flag file is missing; ``crash`` cells raise a plain bug."""
    if spec["kind"] == "crash":
        raise ZeroDivisionError("a bug in the cell")
    if spec["kind"] == "flaky" and not (Path(flags) / "fixed").exists():
        raise TrainingError("non-finite loss at step 3")
    return pd.DataFrame({"value": [spec["x"]] * 2}), f"value {spec['x']}"


def _cells(kinds: dict[str, str]) -> list[Cell]:
    return [Cell.make((name,), {"kind": kind}, f"cell {name}", {"kind": kind, "x": i}, cpu=0.25, cost=i)
            for i, (name, kind) in enumerate(kinds.items())]


@pytest.fixture(autouse=True)
def _by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial workers need not import tests/
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_failed_cells_are_kept_listed_and_retried_on_request(ray_local, tmp_path):
    store, flags = CellStore(tmp_path / "cells"), tmp_path / "flags"
    flags.mkdir()
    cells = _cells({"a": "ok", "b": "flaky", "c": "crash"})
    run = dict(shared={"flags": str(flags)}, what="grid-test", storage=tmp_path, log=lambda s: None, max_failures=0)
    first = run_cells(cells, store, _cell_fn, **run)
    assert (first.ran, first.skipped, [c.what for c in first.done], first.unfinished) == (3, 0, ["cell a"], [])
    errors = {c.what: msg for c, msg in first.failed}
    assert errors["cell b"] == "TrainingError: non-finite loss at step 3"
    assert errors["cell c"].startswith("crashed: ") and "a bug in the cell" in errors["cell c"]
    assert list(first.rows(store)["value"]) == [0, 0] and "cell_seconds" in first.rows(store)

    again = run_cells(cells, store, _cell_fn, **run)  # failed cells are results: not run again silently
    assert (again.ran, again.skipped, len(again.failed)) == (0, 1, 2)

    (flags / "fixed").touch()
    retried = run_cells(cells, store, _cell_fn, retry_failed=True, **run)
    assert retried.ran == 2 and [c.what for c in retried.done] == ["cell a", "cell b"]
    assert [c.what for c, _ in retried.failed] == ["cell c"]
    assert not (store.root / (cells[1].name + ".failed.json")).exists(), "a cell that now finished is not failed"


def test_plan_orders_todo_longest_first_and_names_are_stable(tmp_path):
    cells = _cells({"x": "ok", "y": "ok", "z": "ok"})
    assert [c.what for c in plan(cells, CellStore(tmp_path))["todo"]] == ["cell z", "cell y", "cell x"]
    assert cells[0].name == _cells({"x": "ok"})[0].name and cells[0].name.startswith("x__")
    assert Cell.from_plain({**cells[0].__dict__, "parts": list(cells[0].parts)}) == cells[0]


def _progress_fn(spec: dict) -> tuple[pd.DataFrame, str]:
    import ray.data

    return pd.DataFrame({"bars": [ray.data.DataContext.get_current().enable_progress_bars]}), "bars"


@pytest.mark.slow
def test_a_trial_draws_no_data_progress_bars(ray_local, tmp_path):
    """A trial's stderr is no terminal, and each redraw of a Ray Data bar there was one more log line:
    the trial process has them off (a fresh process has them on)."""
    store = CellStore(tmp_path / "cells")
    res = run_cells(_cells({"a": "ok"}), store, _progress_fn, shared={}, what="bars", storage=tmp_path,
                    log=lambda s: None)
    assert list(res.rows(store)["bars"]) == [False]


def _where_fn(spec: dict) -> tuple[pd.DataFrame, str]:
    import time

    from ray import tune

    time.sleep(spec["sleep"])
    return pd.DataFrame({"trial": [tune.get_context().get_trial_id()]}), "ok"


@pytest.mark.slow
def test_cheap_cells_run_first_many_to_a_trial(ray_local, tmp_path):
    """Cheap cells (a feature classifier's) go first, dealt into a few trials, and the grid as it
    stands after them is handed on (a comparison writes its first answers there) before any costly
    cell starts; a costly cell is a trial of its own."""
    from tl.grid import CELLS_PER_TRIAL, bundles

    cheap = [Cell.make((f"f{i}",), {"i": i}, f"cheap {i}", {"sleep": 0.0}, cpu=0.25, cost=0.1, cheap=True)
             for i in range(12)]
    costly = [Cell.make((f"t{i}",), {"i": i}, f"costly {i}", {"sleep": 0.5}, cpu=1.0, cost=10.0 + i)
              for i in range(2)]
    store, seen = CellStore(tmp_path / "cells"), []
    res = run_cells(costly + cheap, store, _where_fn, shared={}, what="phases", storage=tmp_path, log=lambda s: None,
                    after_cheap=lambda partial: seen.append(([c.what for c in partial.done],
                                                             [c.what for c in partial.unfinished])))
    assert len(res.done) == 14 and not res.failed and not res.unfinished
    assert len(seen) == 1 and sorted(seen[0][0]) == sorted(c.what for c in cheap)
    assert sorted(seen[0][1]) == sorted(c.what for c in costly)
    rows = {c.what: store.load(c) for c in cheap + costly}
    cheap_rows = pd.concat([rows[c.what] for c in cheap])
    costly_rows = pd.concat([rows[c.what] for c in costly])
    assert cheap_rows["cell_finished"].max() <= costly_rows["cell_started"].min()
    assert cheap_rows["trial"].nunique() < len(cheap), "cheap cells share trials"
    assert costly_rows["trial"].nunique() == len(costly)
    # dealing: at least the slots, at most CELLS_PER_TRIAL a trial, costs balanced
    dealt = bundles(cheap, 4)
    assert len(dealt) == 4 and sorted(len(b) for b in dealt) == [3, 3, 3, 3]
    many = [Cell.make((f"m{i}",), {"i": i}, "m", {}, cheap=True) for i in range(3 * CELLS_PER_TRIAL + 1)]
    assert len(bundles(many, 2)) == 4 and max(len(b) for b in bundles(many, 2)) <= CELLS_PER_TRIAL


def test_progress_groups_cheap_cells_and_says_the_time_left():
    """A costly cell's result is a line of its own, cheap ones share lines (a thousand of them must not
    flood the console); each line says done/total, and once a cell of every kind left has finished, the
    time left at the rate measured on its kind (cost units from ``Cell.cost``)."""
    from tl.grid import CHEAP_PER_LINE, Progress

    cheap = [Cell.make((f"f{i}",), {"i": i}, f"f{i}", {}, cost=1.0, cheap=True) for i in range(2 * CHEAP_PER_LINE)]
    costly = [Cell.make((f"t{i}",), {"i": i}, f"t{i}", {}, cost=100.0) for i in range(3)]
    lines: list[str] = []
    progress = Progress(lines.append, "p", cheap + costly)
    progress.start_phase(True)
    for c in cheap:
        progress.finished(c.name, f"{c.what}: ok")
    progress.flush()
    assert len(lines) == 2 and lines[0].startswith(f"[p] {CHEAP_PER_LINE}/15 f0: ok; f1: ok")
    assert lines[1].startswith("[p] 12/15 ") and "left" not in lines[1]  # no trained cell has finished yet
    progress.start_phase(False)
    progress.finished(costly[0].name, "t0: ok")
    progress.finished(costly[0].name, "t0: ok")  # Tune may hand a result on twice: counted once
    assert len(lines) == 3 and lines[2].startswith("[p] 13/15 t0: ok (") and "s left)" in lines[2]
    for c in costly[1:]:
        progress.finished(c.name, "ok")
    assert len(lines) == 5 and lines[-1].startswith("[p] 15/15 ") and "left" not in lines[-1]
