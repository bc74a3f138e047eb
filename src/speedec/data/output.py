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
import os
import tempfile
from pathlib import Path

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    temp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            temp_name = handle.name
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
        temp_name = None
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if temp_name is not None:
            try:
                os.unlink(temp_name)
            except OSError:
                pass


def atomic_write_text(path: Path, text: str) -> str:
    """Write UTF-8 text atomically; return its sha256 for the manifest."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def manifest_json(manifest: dict) -> str:
    """The manifest as stable JSON: sorted keys, fixed indentation, final newline."""
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(out_dir / "manifest.json", manifest_json(manifest))
