"""The package's layers (docs/architecture.md, "Layers") as CI checks: the import-linter contract in
pyproject.toml, and no import circle anywhere in tl/ (module level or inside functions)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contract_holds():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    succ = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]
                counter[0] += 1
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(succ.get(nxt, ()))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
    return out


def test_no_import_circle_in_tl():
    import grimp

    assert _cycles(grimp.build_graph("tl")) == []


def test_tl_and_its_commands_use_rays_public_apis_only():
    """Nothing of Ray's private modules (``ray._private``, ``ray.*._internal``) is imported by tl, its
    workflows, benchmarks or cluster scripts, at module level or inside a function: an upgrade of Ray
    may change them without notice (docs/architecture.md, "Ray in this project")."""
    import ast

    found = []
    for folder in ("tl", "workflows", "benchmarks", "cluster"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n.startswith("ray.") and any(p.startswith("_") for p in n.split(".")[1:])]
    assert not found, found


def test_the_console_filter_keeps_tls_lines_and_drops_rays_forwarded_ones():
    """workflows._cli._WorkerLines: a worker's tl line passes without Ray's prefix; Ray's forwarded lines (a
    worker's own, the autoscaler's, a raylet's and the GCS's notices about a dead node, with the indented lines
    that continue them) stay in the log files; the process's own lines pass as they are."""
    import io

    from workflows._cli import _WorkerLines

    sink = io.StringIO()
    out = _WorkerLines(sink)
    out.write("(pid=4242) [compare] 3/8 optdigits 1-shot seed 0 prototype: 80.0%\n"
              "(TrainWorker pid=77, ip=10.0.0.2) Reporting training result 1\n"
              "(autoscaler +2s) Adding 1 node(s)\n"
              "(raylet) The node with node id: abc has been marked dead because the detector has missed too many\n"
              "\t(1) the process was killed\n\t(2) raylet has lagging heartbeats due to slow network\n"
              "(raylet, ip=10.0.0.3) A worker died or was killed while executing a task\n"
              "\x1b[36m(pid=gcs_server)\x1b[0m Failed to remove 1 bundle(s) at node abc\n"
              "rows: /tmp/out/rows.parquet\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1\n")
    out.flush()
    assert sink.getvalue().splitlines() == ["[compare] 3/8 optdigits 1-shot seed 0 prototype: 80.0%",
                                            "rows: /tmp/out/rows.parquet",
                                            "Traceback (most recent call last):", '  File "x.py", line 1']
