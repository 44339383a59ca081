"""Running a workflow on a Ray cluster through the Jobs API (docs/architecture.md, "Ray in this project").

Why a job and not a Ray Client connection from a laptop: a job's driver runs on the head, next
to the cluster's storage, and outlives the submitter's connection; the code travels as a runtime
environment (the repository, without results, caches or virtual environments), and the cluster's
token authentication guards it. This module holds the logic; ``python -m workflows.submit`` only
parses arguments. It never starts or connects a Ray driver itself.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tl.errors import TLError
from tl.runtime import COMMIT_VAR, REPO_ROOT, git_head

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded (besides what .gitignore and .rayignore already drop): results, caches, environments.
UPLOAD_EXCLUDES = [
    ".git/", ".venv/", "venv/", "results/", "storage/", "ray_results/", ".cluster/", ".pytest_cache/",
    ".ruff_cache/", ".mypy_cache/", "__pycache__/", "*.egg-info/", "*.pt", "*.safetensors", "*.ckpt",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(TLError):
    """The cluster, its address, its token or a job is wrong; the message names which."""


def jobs_address(address: str | None) -> str:
    """The Jobs API address: ``address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the default
    dashboard (the fall-backs of ``ray job submit``); ``host:port`` means ``http://host:port``."""
    a = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_JOBS_ADDRESS
    if a.startswith("ray://") or a == "auto":
        raise ClusterError(f"--address {a}: the Jobs API needs the dashboard's http address, e.g. "
                           f"{DEFAULT_JOBS_ADDRESS} (not a ray:// client address or 'auto')")
    return (a if "://" in a else "http://" + a).rstrip("/")


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The cluster's token: ``token_file``, else RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names.
    None: leave it to Ray (``~/.ray/auth_token`` when RAY_AUTH_MODE=token)."""
    source = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token_file and os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if not source:
        return None
    what = "--token-file" if token_file else "RAY_AUTH_TOKEN_PATH"
    try:
        token = Path(source).expanduser().read_text().strip()
    except OSError as exc:
        raise ClusterError(f"{what} {source}: cannot read the token ({exc.strerror or exc})") from exc
    if not token:
        raise ClusterError(f"{what} {source}: the file is empty")
    return token


def job_client(address: str, token: str | None = None) -> Any:
    """A JobSubmissionClient carrying ``token`` as a bearer header (explicit, so it works whatever this
    process's RAY_AUTH_MODE is). Errors name the address and say whether it was the token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise ClusterError(f"--address {address}: the cluster refused the token "
                           f"({'none given' if not token else 'wrong token'}); pass --token-file or set "
                           f"RAY_AUTH_TOKEN_PATH. {str(exc).splitlines()[0]}") from exc
    except (ConnectionError, OSError) as exc:
        raise ClusterError(f"--address {address}: no Ray Jobs API answers there ({str(exc).splitlines()[0]})") from exc
    except RuntimeError as exc:  # Ray wraps "cannot connect" in a RuntimeError
        raise ClusterError(f"--address {address}: no Ray Jobs API answers there ({str(exc).splitlines()[0]})") from exc


#: set in every process of a tl job: a Ray Train worker's print goes to its stdout once (Train's
#: print patch would also log it, and the console would show each tl line twice); Train's controller
#: polls its workers every 0.5 s rather than 2 s: a worker's report waits for that poll (its result
#: queue holds one), and a run's end is seen at the next one (benchmarks/train_overhead.py)
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def runtime_env(working_dir: str | os.PathLike = REPO_ROOT, excludes: Sequence[str] = (),
                env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: the repository as working_dir (every node imports ``tl`` and
    ``workflows`` from it), without results, caches and virtual environments; ``WORKER_ENV`` and
    ``env_vars`` in every process."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise ClusterError(f"--working-dir {wd}: not a directory")
    return {"working_dir": str(wd), "excludes": [*UPLOAD_EXCLUDES, *excludes],
            "env_vars": {**WORKER_ENV, **(env_vars or {})}}


def commit_env(working_dir: str | os.PathLike) -> dict[str, str]:
    """The commit of the uploaded code, for the job's provenance (the upload leaves .git out); a
    working tree with uncommitted changes is marked ``+dirty``."""
    head = git_head(working_dir, dirty_mark=True)
    return {COMMIT_VAR: head} if head else {}


def path_warnings(argv: Sequence[str]) -> list[str]:
    """What in a workflow's arguments would land on a node's own disk or the job's throw-away working
    directory: a missing or relative --storage, a relative --output."""
    def value(flag: str) -> str | None:
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None

    if not any(a.startswith("workflows.") for a in argv):
        return []  # not one of ours: its paths are its own business
    out = []
    storage, output = value("--storage"), value("--output")
    if storage is None:
        out.append("no --storage: each node would use its own ~/.cache/tl; pass a path every node sees "
                   "(NFS, a PVC, s3://...)")
    elif not (storage.startswith("/") or "://" in storage):
        out.append(f"--storage {storage} is relative: it would be inside the job's temporary working directory")
    if output is None or not (output.startswith("/") or "://" in output):
        out.append(f"--output {output or '(default results/<experiment>)'} is relative: the results would be written "
                   f"inside the job's temporary working directory on the head and lost; pass an absolute shared path")
    return out


def submit(client: Any, argv: Sequence[str] | str, env: dict[str, Any], submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None) -> str:
    """Submit ``argv`` (a command line) as a job; returns its submission id."""
    from ray.exceptions import AuthenticationError

    entrypoint = argv if isinstance(argv, str) else shlex.join(argv)
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                                 entrypoint_num_cpus=entrypoint_num_cpus)
    except AuthenticationError as exc:
        raise ClusterError(f"the cluster at {client.get_address()} refused the job: "
                           f"{str(exc).splitlines()[0]}") from exc


def follow(client: Any, job_id: str, write: Callable[[str], Any] = sys.stdout.write, poll_s: float = 1.0) -> Any:
    """Stream the job's logs until it ends; returns its JobInfo."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream closed early (head restarting): fall back to polling
        write(f"[submit] log stream of {job_id} ended early ({exc}); waiting for the job to finish\n")
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL or getattr(info.status, "value", None) in TERMINAL:
            return info
        time.sleep(poll_s)


def exit_status(info: Any) -> int:
    """0 for a job that succeeded; the driver's own exit code (or 1) for one that failed; 130 if stopped."""
    status = getattr(info.status, "value", str(info.status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return 130
    return info.driver_exit_code if info.driver_exit_code else 1


def run_job(address: str | None, argv: Sequence[str], token_file: str | None = None,
            working_dir: str | os.PathLike = REPO_ROOT, excludes: Sequence[str] = (), wait: bool = True,
            submission_id: str | None = None, log: Callable[[str], Any] = print) -> int:
    """Submit ``argv`` to the cluster at ``address``, stream its logs, return its exit status."""
    if not argv:
        raise ClusterError("no command to run: put it after `--`, e.g. -- python -m workflows.compare --smoke-test")
    addr = jobs_address(address)
    for w in path_warnings(argv):
        log(f"[submit] warning: {w}")
    client = job_client(addr, read_token(token_file))
    t0 = time.time()
    job_id = submit(client, argv, runtime_env(working_dir, excludes, env_vars=commit_env(working_dir)), submission_id)
    log(f"[submit] job {job_id} submitted to {addr}: {shlex.join(argv)}")
    if not wait:
        log(f"[submit] follow it with: ray job logs --follow --address {addr} {job_id}")
        return 0
    try:
        info = follow(client, job_id)
    except KeyboardInterrupt:
        log(f"\n[submit] stopped following; job {job_id} keeps running (stop it with "
            f"`ray job stop --address {addr} {job_id}`)")
        return 130
    code = exit_status(info)
    status = getattr(info.status, "value", str(info.status))
    log(f"[submit] job {job_id} {status} in {time.time() - t0:.0f} s (exit status {code})"
        + (f": {info.message}" if code and info.message else ""))
    return code
