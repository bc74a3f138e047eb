"""Writing prepared data: atomic files and a reproducible manifest.

A reader (a training run started in parallel, a second preparation) must
never see half a file, so every file is written to a temporary name in the
same directory and renamed over the target, which is atomic on POSIX. The
manifest holds no timestamps or absolute paths: two runs on the same
downloads give byte-identical output, manifest included.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from speedec import storage
from speedec.errors import DataError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create the output directory and check that files can be written in it."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise DataError(f"output directory {path} is not writable: {exc.strerror or exc}") from exc
    return path


def atomic_write_text(path: Path, text: str) -> str:
    """:func:`speedec.storage.atomic_write_text` (returns the sha256 for the
    manifest), with a failed write reported as a DataError."""
    try:
        return storage.atomic_write_text(path, text)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc


def manifest_json(manifest: dict) -> str:
    """The manifest as stable JSON: sorted keys, fixed indentation, final newline."""
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(out_dir / "manifest.json", manifest_json(manifest))
