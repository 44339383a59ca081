"""Rebuild summary.md, summary.csv and accuracy_vs_shots.png from a results folder's rows.parquet.

    python -m workflows.report results/fewshot-all
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workflows import _cli


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m workflows.report", description=__doc__.splitlines()[0])
    p.add_argument("results", help="a folder with rows.parquet")
    p.add_argument("--title", default="")
    args = p.parse_args()

    import json

    import pandas as pd

    from tl.errors import DataError
    from tl.report import describe, write_reports

    folder = Path(args.results)
    if not (folder / "rows.parquet").is_file():
        raise DataError(f"'{folder}' has no rows.parquet")
    rows = pd.read_parquet(folder / "rows.parquet")
    cfg = json.loads(rows["config"].iloc[0]) if "config" in rows.columns else {}
    note = describe(cfg, cfg.get("test_split") or cfg.get("split", "?"), rows)
    title = args.title or f"{cfg.get('backbone', '')}: {rows['episode'].nunique()} episodes x {rows['seed'].nunique()} seed(s)"
    write_reports(rows, folder, note, title)
    print(f"summary: {folder / 'summary.md'}\nplot: {folder / 'accuracy_vs_shots.png'}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
