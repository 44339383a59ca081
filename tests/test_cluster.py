"""A real Ray cluster, not a mock: three nodes on this machine (cluster/local.py), each its own
``ray start`` with token authentication on; the comparison submitted through the Jobs API; a
submission without the token refused; a worker node killed mid-comparison (the first worker seen
running a trained cell's trial); nothing left behind.

The cluster's processes get RAY_AUTH_MODE=token from cluster/local.py; this test process keeps
conftest's RAY_AUTH_MODE=disabled and talks to the cluster over HTTP with an explicit bearer
header, so the session's own local Ray (the ``pretrained`` fixture) is never confused with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workflows._cli import TL_LINE

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "cluster" / "local.py"
PY = sys.executable
CONFIGS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "launcher-aws.yaml"]


def _local():
    """cluster/local.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("tl_cluster_local", LOCAL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pyproject() -> tuple[dict[str, str], str]:
    """The pinned dependencies {name: version}, the ``imagenet`` extra's with them (a cluster runs
    ``weights: imagenet`` too), and the image's Python tag (py311) from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"] + project["optional-dependencies"]["imagenet"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        assert m, f"pyproject dependency '{dep}' is not pinned with =="
        pins[m.group(1).lower()] = m.group(3)
    low = re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    return pins, f"py3{low}"


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_pins_what_pyproject_pins(name):
    pins, py = _pyproject()
    ray = pins["ray"]
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d]
    images = {m for s in _strings(docs) for m in re.findall(r"rayproject/ray:[^\s\"']+", s)}
    assert images == {f"rayproject/ray:{ray}-{py}", f"rayproject/ray:{ray}-{py}-gpu"}, images  # CPU and GPU
    versions = [str(v) for v in _find(docs, "rayVersion")]
    if name.startswith("kuberay"):
        assert versions == [ray], versions
        assert [a["mode"] for a in _find(docs, "authOptions")] == ["token"]
        assert list(_find(docs, "serviceType")) == ["ClusterIP"]
        assert not [d for d in docs if d.get("kind") in ("Ingress", "Service")]
    else:
        text = (REPO / "cluster" / name).read_text()
        assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    # every Python package the config installs is pinned to pyproject's version
    installed = {}
    for s in _strings(docs):
        if name == "kuberay-rayjob.yaml" and "pip:" in s:
            s = " ".join(yaml.safe_load(s)["pip"])
        installed.update({k.lower(): v for k, v in re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s\"']*)", s)})
    if name != "kuberay-raycluster.yaml":  # the RayCluster gets its packages from the job's runtime env
        assert installed == {k: v for k, v in pins.items() if k != "ray"}, installed


def _ports_free(base: int) -> bool:
    for port in [base, base + 1, base + 50, *range(base + 100, base + 400)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_ports_in_the_ephemeral_range_are_refused_before_any_node_starts():
    """A node whose ports lie where outgoing connections take theirs fails to start now and then (CI, 2026-12-07:
    three `ray start` time-outs in a row at --port 36000): refused at once, naming the range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    state_dir = Path(tempfile.mkdtemp(prefix="tlp-", dir="/tmp"))
    try:
        r = subprocess.run([PY, str(LOCAL), "up", "--state-dir", str(state_dir / "c"), "--port", str(low + 1000),
                            "--dashboard-port", str(low - 500)], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "ephemeral range" in r.stderr and "ip_local_port_range" in r.stderr, r.stderr
        assert not (state_dir / "c").exists()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + two workers (2 CPUs each), token auth on, in a short /tmp dir; always taken down."""
    state_dir = tempfile.mkdtemp(prefix="tlc-", dir="/tmp")
    # below the kernel's ephemeral range (32768-60999 here), where other processes' connections take ports
    base = next(b for b in random.sample(range(21000, 32000, 1000), 11) if _ports_free(b))
    r = subprocess.run([PY, str(LOCAL), "up", "--state-dir", state_dir, "--port", str(base),
                        "--dashboard-port", str(base + 50), "--object-store-mb", "300"],
                       capture_output=True, check=False, text=True, timeout=900)
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        state = json.loads((Path(state_dir) / "cluster.json").read_text())
        assert [n["name"] for n in state["nodes"]] == ["head", "w1", "w2"]
        yield state
    finally:
        if (Path(state_dir) / "cluster.json").exists():
            subprocess.run([PY, str(LOCAL), "down", "--state-dir", state_dir], capture_output=True, check=False,
                           timeout=300)
        shutil.rmtree(state_dir, ignore_errors=True)


def _submit_cli(state: dict, argv: list[str], token_file: str | None, home: Path, timeout: float = 1200,
                wait: bool = True):
    """``python -m workflows.submit`` run to its end (a CompletedProcess) or, with ``wait=False``, started (a
    Popen whose stdout and stderr go to files in ``home``, read back with ``_job_output``)."""
    cmd = [PY, "-m", "workflows.submit", "--address", state["dashboard_url"]]
    cmd += ["--token-file", token_file] if token_file else []
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    if not wait:
        with open(home / "submit.stdout", "w") as stdout, open(home / "submit.stderr", "w") as stderr:
            return subprocess.Popen(cmd + ["--", *argv], cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)
    return subprocess.run(cmd + ["--", *argv], cwd=REPO, env=env, capture_output=True, check=False, text=True,
                          timeout=timeout)


def _job_output(home: Path) -> tuple[str, str]:
    """What a ``_submit_cli(..., wait=False)`` with this ``home`` wrote so far: (stdout, stderr)."""
    return (home / "submit.stdout").read_text(), (home / "submit.stderr").read_text()


@pytest.mark.slow
def test_submission_without_the_token_is_refused(cluster, tmp_path):
    from tl.cluster import ClusterError, job_client

    addr = cluster["dashboard_url"]
    with pytest.raises(ClusterError, match=r"refused the token \(none given\)"):
        job_client(addr, None)
    with pytest.raises(ClusterError, match=r"refused the token \(wrong token\)"):
        job_client(addr, "0" * 64)
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token")
    r = _submit_cli(cluster, ["python", "-c", "print('should never run')"], str(wrong), tmp_path)
    assert r.returncode == 2 and f"--address {addr}: the cluster refused the token" in r.stderr, r.stderr[-2000:]
    # Ray's own CLI, no token anywhere (HOME without ~/.ray/auth_token): refused by the server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API"))}
    r = subprocess.run([str(Path(PY).parent / "ray"), "job", "submit", "--address", addr, "--", "echo", "hi"],
                       env={**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                       check=False,
                       text=True, timeout=120)
    assert r.returncode != 0 and "Unauthorized" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    # with the token, the same CLI is let in, and no job was created by the refused attempts
    r = subprocess.run([str(Path(PY).parent / "ray"), "job", "list", "--address", addr],
                       env={**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token",
                            "RAY_AUTH_TOKEN_PATH": cluster["token_file"]}, capture_output=True, check=False,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "should never run" not in r.stdout and "echo hi" not in r.stdout


def _driver_env(cluster: dict, home: Path) -> dict[str, str]:
    """A driver on this machine connected to the cluster directly (``--address``), as a user runs one."""
    env = _local().auth_env(cluster)
    env["HOME"] = str(home)
    return env


@pytest.mark.slow
def test_adaptation_runs_overlap_and_trials_train_workers_and_extraction_use_what_ray_assigned_them(
        cluster, pretrained, tmp_path):
    """Two checks on the 3 nodes (1, 2 and 2 CPUs). The adaptation benchmark's runs are grid cells: two
    Ray Train runs go at once (a job). Then cluster/probe.py, a driver connected directly: a trial of 2 CPUs
    runs 2 threads, a Train worker of 1 CPU runs 1 (the driver's machine has more cores: the old rule gave it
    those), and an extraction of 4 blocks runs more than one task at once."""
    storage = Path(cluster["storage"]) / "adapt"
    out = storage / "out"
    argv = ["python", "-m", "workflows.adapt", "--smoke-test", "--workers", "1", "--storage", str(storage),
            "--output", str(out), "--set", f"weights={pretrained}", "--set", "params.steps=2",
            "--set", "checkpoint_every=2"]
    job = _submit_cli(cluster, argv, cluster["token_file"], tmp_path, wait=False)
    try:
        # the probe once the job has ended: its extraction's concurrency is the cluster's, not what the job leaves
        returncode = job.wait(timeout=1200)
        r = subprocess.run([PY, str(REPO / "cluster" / "probe.py"), "--address", cluster["gcs_address"], "--storage",
                            str(Path(cluster["storage"]) / "probe"), "--trial-cpus", "2", "--images", "4096"],
                           cwd=REPO, env=_driver_env(cluster, tmp_path), capture_output=True, text=True, timeout=900)
    finally:
        if job.poll() is None:  # an assertion or a time-out above: the job's follower is not left behind
            job.kill()
            job.wait()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    probed = json.loads(r.stdout.strip().splitlines()[-1])
    assert probed["nodes"] == 3 and probed["storage_shared"]
    assert probed["trial"] == {"cpus": 2.0, "threads": 2, "torch_threads": 2}, probed
    assert probed["train_worker"] == {"cpus": 1.0, "threads": 1, "torch_threads": 1}, probed
    assert probed["extraction"]["tasks"] >= 4 and probed["extraction"]["most_at_once"] > 1, probed
    stdout, stderr = _job_output(tmp_path)
    assert returncode == 0, (stdout[-4000:], stderr[-4000:])
    runs = pd.read_csv(out / "runs.csv").groupby("run").first()
    assert len(runs) == 2 and set(runs["method"]) == {"source_only", "dann"}
    assert runs["started_at"].max() < runs["finished_at"].min(), runs[["method", "started_at", "finished_at"]]
    print(f"adaptation runs overlapped for {runs['finished_at'].min() - runs['started_at'].max():.1f} s on "
          f"nodes {sorted(set(runs['node']))}; probe: {probed}")


@pytest.mark.slow
def test_a_comparison_on_a_folder_one_node_cannot_see_is_refused_before_any_trial(cluster, pretrained, tmp_path):
    """A fourth node whose /tmp/tl-own-... is its own disk (a tmpfs in its own mount namespace); a comparison
    run directly against the cluster with its storage there stops at once, naming the folder."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("`unshare -m` is not permitted here (it needs root): no node can have a disk of its own")
    own = Path(tempfile.mkdtemp(prefix="tl-own-", dir="/tmp"))
    r = subprocess.run([PY, str(LOCAL), "add", "--own-disk", str(own), "--state-dir", cluster["state_dir"]],
                       capture_output=True, check=False, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    name = json.loads((Path(cluster["state_dir"]) / "cluster.json").read_text())["nodes"][-1]["name"]
    try:
        storage, out = own / "home", tmp_path / "out"
        t0 = time.time()
        r = subprocess.run([PY, "-m", "workflows.compare", "--smoke-test", "--address", cluster["gcs_address"],
                            "--storage", str(storage), "--output", str(out), "--set", f"weights={pretrained}"],
                           cwd=REPO, env=_driver_env(cluster, tmp_path), capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, (r.stdout[-3000:], r.stderr[-3000:])
        assert re.search(rf"storage path '{re.escape(str(storage))}' is not shared: 1 of the cluster's \d+ nodes \(",
                         r.stderr), r.stderr[-3000:]
        assert "s3://" in r.stderr.strip().splitlines()[-1]
        assert sorted(p.name for p in storage.iterdir()) == [], "no cell, cache or trial folder was written"
        assert not out.exists()
        print(f"refused after {time.time() - t0:.1f} s: {r.stderr.strip().splitlines()[-1][:200]}")
    finally:
        subprocess.run([PY, str(LOCAL), "remove", name, "--state-dir", cluster["state_dir"]], capture_output=True,
                       check=False, timeout=300)
        shutil.rmtree(own, ignore_errors=True)


def _trial_running_on(local, node: dict) -> bool:
    """A Tune trial executing on ``node`` (its worker retitles itself "ray::ImplicitFunc.train")."""
    return any(local._cmdline(p).startswith("ray::ImplicitFunc.train") for p in local.node_processes(node))


@pytest.mark.slow
def test_compare_job_runs_on_several_nodes_and_survives_a_killed_worker_node(cluster, pretrained, tmp_path):
    """The smoke comparison submitted as a job (workflows.submit); once its feature cells are done, the first
    worker node seen running a trained cell's trial is killed: the job still succeeds, Tune retries the lost
    trial on another node, and the rows come from several nodes."""
    local = _local()
    storage = Path(cluster["storage"]) / "smoke"
    out = storage / "out"
    argv = ["python", "-m", "workflows.compare", "--smoke-test", "--storage", str(storage), "--output", str(out),
            "--set", f"weights={pretrained}"]
    t0 = time.time()
    job = _submit_cli(cluster, argv, cluster["token_file"], tmp_path, wait=False)
    try:
        workers = [n for n in cluster["nodes"] if n["name"] != "head"]  # the driver runs on the head
        deadline = time.time() + 900
        # the feature cells run first, many to a trial, and end too quickly to be caught running: the trained cells
        # (finetune) follow once the interim summary.md is written, one trial each
        while not ((out / "summary.md").exists() and (busy := [n for n in workers if _trial_running_on(local, n)])):
            assert job.poll() is None, f"job ended before a trained cell's trial ran:\n{_job_output(tmp_path)[1][-3000:]}"
            assert time.time() < deadline, "no trained cell's trial reached a worker node within 900 s"
            time.sleep(0.3)
        victim = busy[0]
        done_before = {p.name for p in (storage / "runs" / "compare-smoke" / "cells").glob("*.parquet")}
        r = subprocess.run([PY, str(LOCAL), "kill", victim["name"], "--state-dir", cluster["state_dir"]],
                           capture_output=True, check=False, text=True, timeout=120)
        assert r.returncode == 0 and f"killed node {victim['name']}" in r.stdout, r.stdout + r.stderr
        assert not local.node_processes(victim)
        returncode = job.wait(timeout=1200)
        wall = time.time() - t0
    finally:
        if job.poll() is None:  # an assertion above failed: the job's follower is not left behind
            job.kill()
            job.wait()
    stdout, stderr = _job_output(tmp_path)
    assert returncode == 0, (stdout[-4000:], stderr[-4000:])
    assert "SUCCEEDED" in stderr and "rows:" in stdout
    for f in ("rows.parquet", "summary.md", "best.yaml", "accuracy_vs_shots.png", "command.txt"):
        assert (out / f).stat().st_size > 0, f
    rows = pd.read_parquet(out / "rows.parquet")
    cells = rows.groupby(["target", "shots", "seed", "strategy"])
    assert cells.ngroups == 8 and len(rows) == 8 * 3 and not rows.duplicated(["strategy", "shots", "episode"]).any()
    # the smoke grid's bd_cspn_bn_target embeds with target statistics, made once on the job's storage: from the whole
    # adapt split (test episodes) and without each of its 2 validation folds (validation episodes)
    assert len(list((storage / "cache" / "bn_stats").iterdir())) == 3
    nodes = {n["node_id"] for n in cluster["nodes"]}
    assert set(rows["node"]) <= nodes and rows["node"].nunique() > 1, rows.groupby("strategy")["node"].unique()
    # provenance inside a job: the upload has no .git, so the submitter's commit travels in the job's env
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert set(rows["git_commit"].str.replace("+dirty", "")) == {head}, set(rows["git_commit"])
    assert all(json.loads(h)["host"] == host for h, host in zip(rows["hardware"], rows["host"]))
    assert (out / "config.yaml").stat().st_size > 0
    # each trial ran one torch thread per CPU Ray assigned it (trained cells 1, feature cells 0.25: one thread)
    assert set(rows["trial_cpus"]) <= {1.0, 0.25} and set(rows["threads"]) == {1}, rows[["trial_cpus", "threads"]]
    # the workflow's console in the job's log (its driver's and, forwarded, its workers' lines; before it, Ray's
    # job manager says it sets up the runtime env and runs the entrypoint): tl's own lines and the paths of its
    # results, no line of Ray's loggers (they are in the files its first line names), nor the notices Ray's GCS
    # and raylets send every driver about the node killed
    foreign = _foreign_lines(stdout)
    assert not foreign, foreign[:20]
    # Tune retried the trials that were lost with the node: their cells finished on another node
    retried = _retried_cells(storage / "tune", "compare-smoke")
    assert retried, f"no trial was retried after {victim['name']} was killed:\n" + stdout[-3000:]
    for shots, label in retried:
        cell = rows[(rows["shots"] == shots) & (rows["strategy"] == label)]
        assert len(cell) == 3, (shots, label, len(cell))
        # a retried trial of several cheap cells skips the ones it finished before the kill (kept as they were)
        if not any(f"__{shots}shot__" in n and f"__{label}__" in n for n in done_before):
            assert victim["node_id"] not in set(cell["node"]), (shots, label, set(cell["node"]))
    print(f"compare --smoke-test as a job on 3 nodes: {wall:.0f} s; cells per node "
          f"{rows.groupby('node')['strategy'].nunique().to_dict()}; killed {victim['name']} "
          f"({victim['node_id'][:8]}) with {len(done_before)} of 8 cells finished; retried (shots, strategy): "
          f"{sorted(retried)}")


def _foreign_lines(stdout: str) -> list[str]:
    """The lines of a workflow's console in a job's log (from its "[ray] Ray's own messages" line on) that are
    neither tl's own nor the paths of its results."""
    start = stdout.index("[ray] Ray's own messages: ")
    return [line for line in stdout[start:].splitlines() if line.strip() and not TL_LINE.match(line)
            and not re.match(r"(rows|summary|best|plot): ", line)]


def _retried_cells(tune_dir: Path, experiment: str) -> set[tuple[int, str]]:
    """(shots, label) of every trial that Tune ran again after a failure, from the experiment's saved state."""
    out = set()
    for state in tune_dir.glob(f"{experiment}-*/experiment_state-*.json"):
        for trial_json, run_metadata in json.loads(state.read_text())["trial_data"]:
            if json.loads(run_metadata).get("num_failures", 0) > 0:
                for cell in json.loads(trial_json)["config"]["cells"]:
                    out.add((cell["spec"]["shots"], cell["spec"]["label"]))
    return out


@pytest.mark.slow
def test_down_leaves_no_process_of_the_cluster(cluster):
    local = _local()
    state_dir = cluster["state_dir"]
    r = subprocess.run([PY, str(LOCAL), "down", "--state-dir", state_dir], capture_output=True, check=False, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (Path(state_dir) / "cluster.json").exists()
    for node in cluster["nodes"]:
        assert local.node_processes(node) == [], node["name"]
        for pid in node["pids"]:  # what `up` recorded is gone (or is now someone else's, outside the session)
            st = local._proc_stat(pid)
            assert st is None or st[1] != node["sid"], (node["name"], pid)
    left = [p for p in os.listdir("/proc") if p.isdigit() and state_dir in local._cmdline(int(p))]
    assert not left, [local._cmdline(int(p))[:200] for p in left]
