"""manifest.json: what a run produced and with what, so a result can be checked and reproduced.

Each artifact is recorded with its SHA-256 and size; :func:`verify_manifest` later tells
whether the files in the run directory are still the ones the run wrote.
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Optional

from dfkd_deploy.core.io import sha256_file, write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# Reported name -> distributions that provide it (first installed one wins; onnxruntime ships
# as several wheels with the same import name).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx2torch": ("onnx2torch",),
    "numpy": ("numpy",),
    "dfkd_deploy": ("dfkd-deploy",),
}


def library_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name, dists in _DISTRIBUTIONS.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def write_manifest(run_dir: str | Path, *, seed: int, artifacts: Iterable[str],
                   extra: Optional[Mapping[str, Any]] = None) -> dict:
    """Hash ``artifacts`` (paths relative to ``run_dir``) and write ``run_dir/manifest.json``."""
    run_dir = Path(run_dir)
    entries: dict[str, dict[str, Any]] = {}
    for name in artifacts:
        rel = _relative(name)
        path = run_dir / rel
        if not path.is_file():
            raise FileNotFoundError(f"artifact {rel} listed for the manifest does not exist in {run_dir}")
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "versions": library_versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "python_implementation": platform.python_implementation()},
        "artifacts": entries,
    }
    if extra:
        manifest["extra"] = dict(extra)
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def verify_manifest(run_dir: str | Path) -> list[str]:
    """Problems found (empty list: every artifact is present and unchanged)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return [f"{MANIFEST} missing in {run_dir}"]
    try:
        artifacts = json.loads(path.read_text(encoding="utf-8"))["artifacts"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} unreadable: {exc}"]
    if not isinstance(artifacts, dict):
        return [f"{MANIFEST} unreadable: artifacts is not a mapping"]
    problems = []
    for name, entry in artifacts.items():
        refused = path_problem(run_dir, name)
        if refused:
            problems.append(refused)   # never opened: the manifest does not choose what is read
            continue
        file = run_dir / name
        if not isinstance(entry, dict):
            problems.append(f"{name}: manifest entry is not a mapping")
        elif not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: size {file.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif sha256_file(file) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (file changed since the run)")
    return problems


def path_problem(root: str | Path, name: object) -> Optional[str]:
    """Why ``name`` (from a manifest) is not a path inside ``root``, or None when it is.

    Refused: anything but a non-empty relative POSIX path, ``..`` or ``.`` parts, backslashes,
    and a path that resolves outside ``root`` (through a symbolic link anywhere along it)."""
    if not isinstance(name, str) or not name:
        return f"{name!r}: not a file name (refused)"
    shown = name.encode("unicode_escape").decode("ascii")[:200]
    rel = PurePosixPath(name)
    if rel.is_absolute() or "\\" in name or "\0" in name or any(p in ("..", ".", "") for p in name.split("/")):
        return f"{shown}: path outside the directory (absolute, '..' or not plain; refused, not read)"
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError):   # a symbolic-link loop
        return f"{shown}: unresolvable symbolic link (refused, not read)"
    if target != base and base not in target.parents:
        return f"{shown}: resolves outside the directory through a symbolic link (refused, not read)"
    return None


def _relative(name: str) -> str:
    """Artifact names stay inside the run directory, written with forward slashes."""
    rel = PurePosixPath(Path(name).as_posix())
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"artifact {name!r} must be a path inside the run directory")
    if rel.as_posix() == MANIFEST:
        raise ValueError(f"{MANIFEST} cannot list itself")
    return rel.as_posix()
