"""The one command-line shape every workflow shares, Ray start-up, and turning errors into exits."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DESCRIPTION_TAIL = "Settings come from defaults, then --config FILE, then each --set key=value."


def parser(prog: str, description: str, package: str = "workflows") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {package}.{prog}", description=f"{description} {DESCRIPTION_TAIL}")
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted, repeatable), e.g. --set epochs=5")
    p.add_argument("--smoke-test", action="store_true", help="tiny data, finishes in seconds")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default=None, metavar="PATH|URI",
                   help="checkpoints, caches and Ray storage: a folder or a URI such as s3://bucket/tl (default "
                        "~/.cache/tl; never inside the repository)")
    p.add_argument("--output", default=None, metavar="DIR|URI",
                   help="where results go: a folder or a URI (default results/<experiment>)")
    p.add_argument("--check", action="store_true",
                   help="check the command line and the config (every key, value and config file) and, for a "
                        "comparison or an export, list the user's data it names (classes, no image decoded), "
                        "then stop: nothing runs, Ray does not start")
    return p


def checked(config: object, notes: list[str] | tuple[str, ...] = ()) -> int:
    """What ``--check`` prints once the config is built (and the user's data it names listed, where
    the workflow does: ``notes`` say what could not be): the command and its keys are valid."""
    backbone, weights = getattr(config, "backbone", None), getattr(config, "weights", None)
    if isinstance(backbone, str) and isinstance(weights, str):  # a weights file that does not fit stops here
        from tl.models.registry import check_weights

        fits = check_weights(backbone, weights, getattr(config, "input_size", None))
        notes = [*notes, fits] if fits else notes
    for note in notes:
        print(f"note: {note}")
    print(f"ok: {type(config).__name__} built, nothing run")
    return 0


@contextmanager
def no_empty_folder(output: str) -> Iterator[None]:
    """Run a block that writes under ``output``; when it fails (bad input: exit 2, or any other error),
    the folders it created on the way to a local ``output`` are removed if they are empty, deepest
    first, so a failed run leaves no empty output folder behind (docs/workflows.md, "Exit statuses").
    A folder that was there before, or that holds anything, is kept."""
    from tl.storage import Location

    loc = Location.of(output)
    created: list[Path] = []
    if loc.is_local:
        for folder in [Path(loc.path), *Path(loc.path).parents]:
            if folder.exists():
                break
            created.append(folder)
    try:
        yield
    except BaseException:
        for folder in created:
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
            elif folder.exists():
                break
        raise


@contextmanager
def output_folder(output: str) -> Iterator[Path]:
    """A local folder for a workflow's results: ``output`` itself, or for a URI a temporary folder
    uploaded there when the workflow ends without an error (checked writable first). A local folder
    this made and the run left empty is removed when the run fails (``no_empty_folder``)."""
    from tl.storage import Location, check_writable

    loc = Location.of(output)
    if not loc.is_local:
        check_writable(loc, "output")
    with no_empty_folder(output), loc.staged() as folder:
        yield folder


def shlex_args() -> list[str]:
    """This process's command-line arguments, quoted for a shell (recorded beside results)."""
    import shlex

    return [shlex.quote(a) for a in sys.argv[1:]]


def local_cpus() -> int:
    """Logical CPUs of the local Ray this module starts: more than cores (docs/architecture.md, "Ray in this project")."""
    return max(4, 2 * (os.cpu_count() or 1))


def init_ray(address: str | None) -> None:
    """Connect to ``address`` or start a local Ray with more logical CPUs than cores (docs/architecture.md, "Ray in this project")."""
    import ray

    from tl.errors import ConfigError

    if ray.is_initialized():
        return
    from tl.cluster import WORKER_ENV

    for key, value in WORKER_ENV.items():  # the local Ray's workers inherit them (a job gets them from submit)
        os.environ.setdefault(key, value)
    ray_log = _ray_lines_to_file()
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address)
        except Exception as exc:
            raise ConfigError(f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0]})") from exc
    else:
        from tl.runtime import CPUS_PER_CORE_VAR

        # its workers inherit it: a worker assigned 2 of these logical CPUs runs 1 torch thread
        os.environ[CPUS_PER_CORE_VAR] = f"{local_cpus() / (os.cpu_count() or 1):g}"
        ray.init(num_cpus=local_cpus())
    ray.data.DataContext.get_current().enable_progress_bars = False
    _ray_lines_to_file(ray_log)  # the loggers Ray set up in ray.init
    workers = _only_tl_lines_from_workers()
    print(f"[ray] Ray's own messages: {ray_log} (this process)"
          + (f", {workers} (its workers)" if workers else ""), flush=True)


#: a line of tl's own: "[pretrain] epoch 3/15 ...", "[compare] 4/66 ..." (Ray's start with a date, a
#: colour code or a word)
TL_LINE = re.compile(r"^\[[a-z][a-z0-9_-]*\] ")


def _ray_lines_to_file(path: Path | None = None) -> Path:
    """Ray's own loggers in this process (``ray`` and below: Ray Data's execution plans, Tune's and
    Train's notices, deprecation notes) write to ``path`` (a new file under the temporary folder by
    default) instead of the console, where a person reads tl's lines (docs/workflows.md)."""
    import logging
    import tempfile
    import time

    if path is None:
        folder = Path(tempfile.gettempdir()) / "tl-logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    import ray  # noqa: F401  (importing Ray sets up its console handler, replaced below)

    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.")]]
    for name in names:
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for h in consoles:
            logger.removeHandler(h)
        if consoles:
            logger.addHandler(to_file)
    return path


#: a line Ray forwards from a worker process ("(RayTrainWorker pid=123, ip=10.0.0.2) text") or its
#: autoscaler ("(autoscaler +2s) text"), its prefix coloured unless RAY_COLOR_PREFIX=0
_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:[^()]*pid=[\w.-]+[^()]*|autoscaler[^()]*|raylet[^()]*)\)"
                        r"(?:\x1b\[[0-9;]*m)? ?(.*)$",
                        re.S)


class _WorkerLines(io.TextIOBase):
    """This process's stdout or stderr with the lines Ray forwards from its workers filtered: tl's own
    (``TL_LINE``) pass without Ray's prefix, the rest stay in the workers' log files; this process's
    own lines pass as they are, except the indented lines that continue a dropped one (a raylet's
    notice about a dead node goes on over several). Plain Python on the stream Ray's log monitor
    prints to (Ray's public ``log_to_driver`` is all or nothing)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream, self.pending, self.dropping = stream, "", False

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            m = _FORWARDED.match(line)
            if m is None:
                if self.dropping and line[:1] in (" ", "\t"):
                    continue
                self.dropping = False
                self.stream.write(line + "\n")
            elif TL_LINE.match(m.group(1)):
                self.dropping = False
                self.stream.write(m.group(1) + "\n")
            else:
                self.dropping = True
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def _only_tl_lines_from_workers() -> str:
    """What Ray forwards from its worker processes to this console: tl's own lines only (``TL_LINE``,
    ``_WorkerLines`` on stdout and stderr); the rest stays in the workers' log files, whose place is
    returned."""
    if not isinstance(sys.stdout, _WorkerLines):
        sys.stdout, sys.stderr = _WorkerLines(sys.stdout), _WorkerLines(sys.stderr)
    return "each node's Ray temp dir (/tmp/ray by default), session_latest/logs"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once on a host:port nobody listens on (``ray.init`` would retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    from tl.errors import ConfigError

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc})") from exc


def run(main: Callable[[], int | None]) -> None:
    """Run a workflow main with the documented exit statuses (``tl.errors.EXIT_*``): a TLError is
    one line on stderr and 2; failed cells 3; unfinished cells 4; Ctrl-C 130; a bug 1."""
    from tl.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED, TLError

    try:
        code = main()
    except TLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception:
        traceback.print_exc()
        sys.exit(EXIT_BUG)
    sys.exit(code or 0)
