"""Crash-safe file writing and resumable jsonl logs.

Every file a long job writes goes to a temporary name in the same directory and is renamed
into place, so a crash never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def default_mode(directory: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give (temporary files start private)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_file(path) as f:
        f.write(data)
    _fsync_dir(Path(path).parent)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file that replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable_dir(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Refuse, before anything is written, a directory output that cannot be written as asked:
    an existing regular file, an existing directory without ``overwrite``, a parent that is a
    file, or a parent that cannot be created or written. ``flag`` names the option to replace
    an existing directory (``--overwrite`` on the command line)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is an existing file, not a directory; choose another output path "
                         "(a results directory is never written over a file).")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass {flag} to replace it, or choose another path.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"Cannot create {path}: {parent} is a file, not a directory; choose another output path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write {path}: {parent} is not writable; choose another output path.")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "overwrite=True") -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` when the block succeeds.

    Refuses (see :func:`check_writable_dir`) an existing file, and an existing directory
    unless ``overwrite=True`` (then the old directory is replaced only after the new one is
    complete). On error the temporary directory is removed.
    """
    path = check_writable_dir(path, overwrite=overwrite, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as error:
        raise InputError(f"Cannot write {path}: {error.strerror or error}; choose another output path.") from error
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JsonlLog:
    """An append-only jsonl file of finished items, keyed by an ``id`` field, for resumable runs.

    Each line is written and flushed whole; a torn last line (a killed process) is ignored
    on reading, so a resumed run redoes only that item.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write from a killed process
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
        return rows

    def done(self) -> set[Any]:
        return {row[self.key] for row in self.read()}

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
