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


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]
REPO_DIRS = ("results/", "workflows/", "docs/", "cluster/", "benchmarks/", "tests/", "tl/")


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line in the pages' code blocks: ``python -m workflows.*`` and
    ``benchmarks.*`` (the command after ``--`` of a job submission included), ``make`` targets and the
    scripts under cluster/; continuation lines joined, trailing comments dropped."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in re.split(r"\s--\s", line):
                    part = part.strip()
                    if re.match(r"(\.venv/bin/)?python (-m (workflows|benchmarks)\.|cluster/)|make ", part):
                        out.append((str(page.relative_to(REPO)), part))
    return out


CONFIGS = sorted((REPO / "workflows" / "configs").glob("*.yaml"))


def config_commands() -> list[tuple[str, str]]:
    """(config, command) for every ``python -m workflows.*`` line in a config file's header comment: the
    command that config was made for, so a config that no longer builds fails like a documented command."""
    out = []
    for path in CONFIGS:
        for line in path.read_text().splitlines():
            match = re.match(r"#\s*(python -m workflows\.\S.*)", line)
            if match:
                out.append((str(path.relative_to(REPO)), re.sub(r"\s+#.*$", "", match.group(1)).strip()))
    return out


def test_every_config_names_its_own_command():
    named = {page for page, command in config_commands() if page in command}
    assert CONFIGS and named == {str(p.relative_to(REPO)) for p in CONFIGS}


def test_docs_have_commands():
    commands = documented_commands()
    modules = {re.search(r"-m ([\w.]+)", c).group(1) for _, c in commands if " -m " in c}
    assert len(commands) > 50 and {"workflows.compare", "workflows.export", "workflows.predict",
                                   "workflows.recommend", "workflows.adapt"} <= modules, modules


def test_every_documented_command_is_valid(monkeypatch, capsys, tmp_path):
    """Each documented command line, checked without running it: its module or script exists, its options
    parse, its config files exist and every --set key and value builds the workflow's config (the
    workflow's own ``--check``); a repository path it names exists (outputs aside); a report folder has
    its rows; a make target exists. The commands themselves run in their --smoke-test form in the
    workflows' own tests."""
    import importlib
    import shlex
    import sys

    makefile = (REPO / "Makefile").read_text()
    bad = []
    for page, command in documented_commands() + config_commands():
        # a placeholder bucket cannot be reached from a test: a local folder stands in for it (the keys and
        # options are what is checked; tests/test_storage.py runs workflows against a real S3 API)
        words = [re.sub(r"\b(s3|gs)://[^\s'\"\],]+", str(tmp_path / "bucket"), w) for w in shlex.split(command)]
        try:
            if words[0] == "make":
                assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), "no such make target"
                continue
            if not words[1] == "-m":  # a script of the repository
                assert (REPO / words[1]).is_file(), f"no file {words[1]}"
                continue
            module, args = words[2], words[3:]
            paths = [a.split("=", 1)[-1] for i, a in enumerate(args) if i == 0 or args[i - 1] != "--output"]
            for p in paths:
                if p.startswith(REPO_DIRS):
                    assert (REPO / p).exists(), f"no {p} in the repository"
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"
            if module.startswith("benchmarks.") or module == "workflows.submit":
                continue  # a benchmark runs when called; a submission's own command is checked on its own
            if module == "workflows.report":
                assert (REPO / args[0] / "rows.parquet").is_file(), f"{args[0]} has no rows.parquet"
                continue
            monkeypatch.setattr(sys, "argv", [module, *args, "--check"])
            code = importlib.import_module(module).main()
            assert code == 0, f"exit {code}"
        except (AssertionError, Exception, SystemExit) as exc:
            bad.append(f"{page}: {command}\n    {type(exc).__name__}: {exc} {capsys.readouterr().err[-300:]}")
    assert not bad, "\n".join(bad)
