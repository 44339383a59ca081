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


def test_a_trial_draws_no_data_progress_bars(ray_local, tmp_path):
    """A trial's stderr is no terminal, and each redraw of a Ray Data bar there was one more log line:
    the trial process has them off (a fresh process has them on)."""
    store = CellStore(tmp_path / "cells")
    res = run_cells(_cells({"a": "ok"}), store, _progress_fn, shared={}, what="bars", storage=tmp_path,
                    log=lambda s: None)
    assert list(res.rows(store)["bars"]) == [False]
