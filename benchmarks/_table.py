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


def save(rows: list[dict], out_dir: Path, stem: str, smoke: bool, header: list[str], part: str = "all") -> pd.DataFrame:
    """This run's rows as ``<stem>.csv`` and ``<stem>.md`` under ``out_dir`` (``<stem>-smoke`` for a
    smoke run), merged with the table's other parts when one part was rerun."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}-smoke" if smoke else stem
    table = merged(rows, out_dir / f"{stem}.csv", part)
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    write_markdown(table, out_dir / f"{stem}.md", header)
    return table


class Rows(list):
    """A benchmark's table rows as they are measured, each printed when recorded."""

    def record(self, part: str, what: str, value: float, unit: str, note: str = "") -> None:
        self.append({"part": part, "measure": what, "value": round(value, 3), "unit": unit, "note": note})
        print(f"{part:>6} {what:<52} {value:10.2f} {unit:<9} {note}", flush=True)


def child(module: str, *args: str) -> dict:
    """Run ``python -m module args`` in its own process with its own local Ray (so a peak RSS is that
    process's alone) and return the JSON of its ``RESULT`` line."""
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       env={**os.environ, "RAY_ADDRESS": ""})
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"benchmark child {module} {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[0][7:])
