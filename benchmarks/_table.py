"""The table every benchmark writes under ``results/bench/``: rows of part, measure, value, unit and
note, as ``<stem>.csv`` and ``<stem>.md``, where a ``--part`` run replaces only that part's rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def merged(rows: list[dict], csv: Path, part: str) -> pd.DataFrame:
    """This run's rows, with the other parts' rows of the existing table when one part was rerun."""
    table = pd.DataFrame(rows)
    if part != "all" and csv.is_file():
        old = pd.read_csv(csv, keep_default_na=False)
        table = pd.concat([old[old["part"] != part], table]).sort_values("part", kind="stable")
    return table


def write_markdown(table: pd.DataFrame, path: Path, header: list[str]) -> None:
    """``header`` lines, then the table; prints where it went."""
    md = [*header, "", "| part | measure | value | unit | note |", "|---|---|---|---|---|"]
    md += [f"| {r.part} | {r.measure} | {r.value} | {r.unit} | {r.note} |" for r in table.itertuples()]
    path.write_text("\n".join(md) + "\n")
    print(f"table: {path}")
