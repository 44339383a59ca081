"""Places on any filesystem pyarrow reaches: a local path, ``s3://bucket/key``, ``gs://…`` and the rest.

tl's storage (cells, Tune and Train storage, caches, pretrained backbones) and every output go through
``Location``, so a local folder and a bucket are the same code (docs/architecture.md, "Layers"). A URI may carry
pyarrow's own query options (``s3://b/tl?endpoint_override=http://host:9000``, as a local S3 server
needs); they travel with every path joined to it, so a Ray worker on another node rebuilds the same
filesystem from the string. Credentials come from the usual places (environment, profile, instance
role), never from tl's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from tl.errors import ConfigError

REMOTE_CACHE = "TL_REMOTE_CACHE"  # where remote files are copied to be opened by path (default: temp dir)


def is_uri(spec: object) -> bool:
    """A ``scheme://`` string other than ``file://`` (a local path spelled as a URI)."""
    return isinstance(spec, str) and "://" in spec and not spec.startswith("file://")


class Location:
    """A file or folder: a pyarrow filesystem and a path on it, plus the URI that names it."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "", query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path.rstrip("/") or path, scheme, query

    @staticmethod
    def of(spec: "str | os.PathLike | Location") -> "Location":
        """A local path (``~`` expanded, made absolute) or a URI; a malformed URI is a ``ConfigError``."""
        if isinstance(spec, Location):
            return spec
        text = str(spec)
        if not is_uri(text):
            local = text.removeprefix("file://")
            return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local)))
        scheme, rest = text.split("://", 1)
        query = rest.split("?", 1)[1] if "?" in rest else ""
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # ArrowInvalid for a bad URI, OSError for a scheme whose library is missing
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"'{text}' is not a storage URI tl can open: {first}") from exc
        if not path.strip("/"):
            raise ConfigError(f"'{text}' names no bucket or folder")
        return Location(fs, path, scheme, query)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local(self) -> Path | None:
        return Path(self.path) if self.is_local else None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.scheme, self.query)

    def __truediv__(self, name: str | os.PathLike) -> "Location":
        return Location(self.fs, f"{self.path}/{str(name).strip('/')}", self.scheme, self.query)

    def __str__(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def kind(self) -> pafs.FileType:
        """File, Directory or NotFound; an unreachable filesystem is a ``ConfigError`` naming the URI."""
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as exc:
            raise ConfigError(f"'{self}' cannot be reached: {_first_line(exc)}") from exc

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: a local file is written beside and renamed; an object store makes an
        object visible only when its upload completes."""
        if self.is_local:
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        with self.fs.open_output_stream(self.path) as out:
            out.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    @contextmanager
    def writer(self) -> Iterator[Any]:
        """An output stream for a file too large to build in memory first, written whole or not at
        all like ``write_bytes``: a local file beside and renamed, an object deleted when the block fails."""
        if not self.is_local:
            try:
                with self.fs.open_output_stream(self.path) as out:
                    yield out
            except BaseException:
                self.unlink()
                raise
            return
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            with pafs.LocalFileSystem().open_output_stream(str(tmp)) as out:
                yield out
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_dir(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def iterdir(self) -> list["Location"]:
        """The entries directly inside this folder, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Location(self.fs, i.path, self.scheme, self.query) for i in sorted(infos, key=lambda i: i.path)]

    def files(self) -> list["Location"]:
        """Every file below this folder, at any depth, sorted by path."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return [Location(self.fs, i.path, self.scheme, self.query)
                for i in sorted(infos, key=lambda i: i.path) if i.type == pafs.FileType.File]

    def relative(self, child: "Location") -> str:
        return child.path[len(self.path):].lstrip("/")

    @property
    def ray_filesystem(self) -> pafs.FileSystem | None:
        """The ``storage_filesystem`` Ray Tune and Train take: None (Ray's own local path) for a local folder."""
        return None if self.is_local else self.fs

    def ray_storage(self) -> dict:
        """``storage_path`` and ``storage_filesystem`` for a Ray Tune or Train ``RunConfig``."""
        return {"storage_path": self.path, "storage_filesystem": self.ray_filesystem}

    def upload(self, folder: Path, last: tuple[str, ...] = ()) -> None:
        """Copy the files of local ``folder`` here, each whole (``write_bytes``); the files named in
        ``last`` are written after every other, so a reader that waits for them never sees a
        half-copied folder."""
        files = sorted((f for f in folder.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f)))
        for f in files:
            (self / f.relative_to(folder).as_posix()).write_bytes(f.read_bytes())

    def fetch(self) -> Path:
        """A local path to open this file or folder by: itself when local, otherwise a copy in a
        cache keyed by the URI and the remote size and modification time (a changed file is
        fetched again)."""
        if self.is_local:
            return Path(self.path)
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"'{self}' does not exist")
        entries = [info] if info.type == pafs.FileType.File else \
            self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        stamp = "|".join(f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(entries, key=lambda i: i.path))
        key = hashlib.sha256(f"{self}|{stamp}".encode()).hexdigest()[:24]
        root = Path(os.environ.get(REMOTE_CACHE) or Path(tempfile.gettempdir()) / "tl-remote") / key
        dest = root / self.name
        if (root / ".complete").is_file():
            return dest
        tmp = root.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if info.type == pafs.FileType.File:
            (tmp / self.name).parent.mkdir(parents=True)
            (tmp / self.name).write_bytes(self.read_bytes())
        else:
            for f in self.files():
                out = tmp / self.name / self.relative(f)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(f.read_bytes())
            (tmp / self.name).mkdir(parents=True, exist_ok=True)
        (tmp / ".complete").write_text("ok")
        try:
            os.replace(tmp, root)
        except OSError:  # another process fetched it first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    @contextmanager
    def staged(self, last: tuple[str, ...] = ()) -> Iterator[Path]:
        """A local folder to write results into: this folder itself when local, otherwise a temporary
        one uploaded here when the block ends without an error (nothing is uploaded on an error)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="tl-out-") as tmp:
            yield Path(tmp)
            self.upload(Path(tmp), last)


def check_writable(loc: Location, what: str) -> Location:
    """Fail now, naming the URI, when ``loc`` cannot be written (missing bucket, no credentials, an
    endpoint nobody answers on): before any trial starts rather than in the middle of a run."""
    if loc.is_local:
        p = Path(loc.path)
        for parent in [p, *p.parents]:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"{what} '{p}' is not writable: '{parent}' is a file")
    probe = loc / f".tl-write-test-{os.getpid()}"
    try:
        loc.mkdir()
        probe.write_bytes(b"ok")
        probe.unlink()
    except (OSError, ConfigError) as exc:
        raise ConfigError(f"{what} '{loc}' is not writable: {_first_line(exc)}") from exc
    return loc


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
