"""Artifact I/O: atomic directories, safetensors weights, meta.json lineage, content hashes.

Every stage writes its outputs into a temporary sibling directory and renames it into
place only when the stage has finished, so DVC and later stages never see half an
artifact. Weights are safetensors only; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import torch
import yaml
from pydantic import AfterValidator
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from slimforge import PACKAGE_ROOTS, REPO_ROOT

WEIGHTS = "model.safetensors"
META = "meta.json"


class ArtifactError(ValueError):
    """A file that is missing, corrupt, or not what the stage expects."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative path, file hash) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def code_version(stage: str | None = None) -> str:
    """sha256 of the sources a stage's artifact depends on (works without git, identical for
    both ways in): the code deps dvc.yaml lists for ``stage``, every package if None.

    Hashing exactly what DVC tracks keeps the two in step: a stage DVC skips as unchanged
    holds a meta.json whose code version is still the current one.
    """
    h = hashlib.sha256()
    for f in code_files(stage):
        h.update(f"{f.relative_to(REPO_ROOT).as_posix()}\0".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def code_files(stage: str | None = None) -> list[Path]:
    """The .py files under the code deps of ``stage`` in dvc.yaml (all packages if None)."""
    if stage is None:
        roots = list(PACKAGE_ROOTS)
    else:
        stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
        if stage not in stages:
            raise ValueError(f"dvc.yaml: no stage {stage!r}; stages: {', '.join(stages)}")
        roots = [REPO_ROOT / d for d in stages[stage].get("deps", [])
                 if any((REPO_ROOT / d).is_relative_to(root) for root in PACKAGE_ROOTS)]
    files = set()
    for root in roots:
        files |= {root} if root.is_file() else set(root.rglob("*.py"))
    return sorted(files)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; rename it over ``final`` only on success.

    A process killed mid-stage (SIGKILL, OOM) leaves its temp directory behind; the next
    atomic_dir for the same ``final`` removes those whose writer is gone.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final)
    tmp = _temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(final: Path) -> Path:
    """``.<name>.tmp-<pid>-<random>`` beside ``final``: hidden, and naming the process that writes it."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sweep_stale_temps(final: Path) -> list[Path]:
    """Remove the temp/old siblings of ``final`` left by writers that no longer run; return them.

    A sibling whose writer is still alive (another process writing the same output) is kept.
    """
    removed = []
    final = Path(final)
    if not final.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            pid = p.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors with a canonical header: the same tensors and metadata give the same bytes.

    safetensors keeps metadata in a hash map, so its key order (and the file's hash) would
    change from process to process; the header is re-written with sorted metadata.
    """
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load safetensors, turning a truncated or corrupt file into a one-line ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        detail = " ".join(str(e).split())  # a forged header can put line breaks in the library's message
        raise ArtifactError(f"{path}: not a readable safetensors file ({detail})") from None


def check_local_path(value: str) -> str:
    """A pydantic validator for params that name a checkpoint on this machine: a plain path only.
    Any URI (http:, file:, gs:, s3:, data:, //host) is refused; only ingest.path reads s3://."""
    if urlsplit(value).scheme or value.startswith("//"):
        raise ValueError(f"{value!r} is not a local path; valid: a plain path (file) relative to the "
                         "workspace, or absolute (URIs are read only by ingest.path, and only s3://)")
    return value


LocalPath = Annotated[str, AfterValidator(check_local_path)]


def write_meta(directory: Path, *, root: Path, stage: str, method: str, config: dict, seed: int | None,
               parents: dict[str, Path], extra: dict | None = None) -> dict:
    """meta.json: what made this artifact, from which inputs (by content hash).

    Parent paths are recorded relative to the workspace ``root`` so that two workspaces
    running the same params write byte-identical meta files.
    """
    meta = {
        "stage": stage,
        "method": method,
        "config": config,
        "seed": seed,
        "code_version": code_version(stage),
        "parents": {name: _parent(root, p) for name, p in parents.items()},
        **(extra or {}),
    }
    write_json_atomic(Path(directory) / META, meta)
    return meta


def _parent(root: Path, path: Path) -> dict:
    """A parent inside the workspace by its relative path; one outside (a user's checkpoint) by
    its absolute path."""
    resolved = Path(path).resolve()
    try:
        shown = resolved.relative_to(Path(root).resolve())
    except ValueError:
        shown = resolved
    return {"path": shown.as_posix(), "sha256": content_hash(path)}


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the stage that makes {Path(directory).name} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
