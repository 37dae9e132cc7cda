"""Filesystem helpers shared by several modules: atomic writes, content hashes, run folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

CHUNK = 1 << 20


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or an exception leaves `path` as it was (absent or the old version), never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def publish_folder(write: Callable[[Path], Any], folder: Path, *, replace: bool) -> None:
    """Run `write(tmp)` on a fresh temporary folder, then rename it to `folder`: never half-written.

    An existing `folder` is swapped out with `replace`, else left as it is (and `tmp` dropped). Without
    `replace`, processes may race to publish the same folder (DDP ranks filling one cache): the first
    rename wins and the others keep it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = folder.with_name(f"{tmp.name}.old")
    try:
        write(tmp)
        if replace and folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)  # no check first: another process may publish in between
        except OSError:
            if replace or not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)`, then move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_json(path: str | Path, record: Any) -> list:
    """Add `record` to the JSON list at `path` and return the whole list, under a lock file: two
    processes appending to the same file (two benchmarks on two cores) keep both their records."""
    path = Path(path)
    with FileLock(path.with_name(path.name + ".lock")):
        records = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        records.append(record)
        write_json(path, records)
    return records


def hash_file(path: str | Path, digest: hashlib._Hash | None = None) -> str:
    """sha256 of a file's bytes (or fold them into `digest` and return its hex)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hash_inputs(paths: list[Path], settings: dict[str, Any]) -> str:
    """One key for a cache: the contents of every input file plus the settings that shape the output."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        hash_file(path, digest)
    return digest.hexdigest()[:16]


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
