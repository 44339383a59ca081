"""Submit a workflow to a Ray cluster as a job: upload the repository, stream the logs, return the exit status.

    python -m workflows.submit --address http://127.0.0.1:8265 --token-file /tmp/tl-cluster/auth_token -- \\
        python -m workflows.compare --smoke-test --storage /shared/tl --output /shared/results/compare-smoke

--storage and --output of the workflow must be paths every node sees (NFS, a PVC, s3://...).
"""

from __future__ import annotations

import argparse
import os
import sys

from workflows import _cli


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m workflows.submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a workflow on a Ray cluster with the Jobs API (a runtime environment with this repository, "
                    "results, caches and virtual environments excluded); exits with the job's status.",
        epilog="example: python -m workflows.submit --address http://127.0.0.1:8265 -- python -m workflows.compare "
               "--smoke-test --storage /shared/tl --output /shared/results/smoke")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard / Jobs API (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
                        "http://127.0.0.1:8265)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p.add_argument("--working-dir", default=None, metavar="DIR", help="what to upload (default: this repository)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave this out of the upload (repeatable; .gitignore and .rayignore apply too)")
    p.add_argument("--submission-id", default=None, help="a job id of your choosing (default: Ray makes one)")
    p.add_argument("--no-wait", action="store_true", help="submit and return at once, without following the logs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run on the cluster")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    from tl.cluster import run_job
    from tl.runtime import REPO_ROOT

    return run_job(args.address, command, token_file=args.token_file,
                   working_dir=os.path.abspath(args.working_dir) if args.working_dir else REPO_ROOT,
                   excludes=args.exclude, wait=not args.no_wait, submission_id=args.submission_id,
                   log=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    _cli.run(main)
