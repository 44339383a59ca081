"""Documentation that cannot go stale: the configuration reference is what the config classes say today,
the README's and docs/' relative links lead to files of the repository, and no tracked file points
outside the repository."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# spelled in two parts so that this file does not match itself
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", "/" + r"work/", "DESIGN" + r"\.md", "steering" + " repo")]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.split()]


def test_configuration_reference_is_current():
    """docs/configuration.md equals what `python -m workflows.reference` writes from today's classes."""
    from workflows.reference import PAGE, render

    assert PAGE.is_file(), "docs/configuration.md is missing: run python -m workflows.reference"
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run python -m workflows.reference"


def test_reference_lists_every_key_and_strategy():
    import dataclasses

    from tl.compare import CompareConfig
    from tl.strategies.registry import REGISTRY
    from workflows.reference import render

    page = render()
    for f in dataclasses.fields(CompareConfig):
        assert f"| `{f.name}` |" in page, f.name
    for name in REGISTRY:
        assert f"### `{name}` (" in page, name


def test_relative_links_in_readme_and_docs_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for path in _tracked("*.md", "*.py", "*.yaml", "*.yml", "*.toml", "*.txt", "*.cfg", "Makefile", ".ci/*"):
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
