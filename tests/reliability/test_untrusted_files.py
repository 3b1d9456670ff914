"""What SECURITY.md promises about files: nothing in the code unpickles or evaluates what it loads
(an ast scan), and a booby-trapped checkpoint is refused at every boundary that takes a user path."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from slimforge.artifacts import ArtifactError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCANNED = ("slimforge", "tasks", "kernels", "flows", "infra")

# ---------------------------------------------------------------------------------------------
# 1. No unsafe deserialisation in the code: an ast scan

# Calls that unpickle (or run) whatever the file holds, by their fully qualified name.
ALWAYS_BAD = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pandas.read_pickle",
    "marshal.load", "marshal.loads", "shelve.open", "yaml.unsafe_load", "yaml.full_load",
    "torch.serialization.load", "eval", "exec",
}
BAD_MODULES = ("dill",)  # every use of dill is a pickle
# name -> (keyword, values that make the call safe)
NEEDS_KEYWORD = {
    "torch.load": ("weights_only", {"True"}),
    "numpy.load": ("allow_pickle", {"False"}),
    "yaml.load": ("Loader", {"yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"}),
}
# (file, qualified name) -> why it is not loading untrusted bytes. Kept empty on purpose: Dask
# (flows/runners.py) pickles our own closures to our own LocalCluster workers inside
# distributed, which is not a call in our code and loads no file.
ALLOWED: dict[tuple[str, str], str] = {}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name from the module's imports (``np`` -> ``numpy``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def unsafe_calls(path: Path) -> list[str]:
    """``file:line: name`` for each call in ``path`` that could unpickle or execute data."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path}:{node.lineno}: import {m}" for m in mods if m.split(".")[0] in BAD_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, aliases)
        if name is None:
            continue
        bad = name in ALWAYS_BAD or name.split(".")[0] in BAD_MODULES
        if name in NEEDS_KEYWORD:
            key, safe = NEEDS_KEYWORD[name]
            given = {k.arg: ast.unparse(k.value) for k in node.keywords}
            bad = given.get(key) not in safe
        where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
        if bad and (where, name) not in ALLOWED:
            found.append(f"{path}:{node.lineno}: {name}")
    return found


def _python_files() -> list[Path]:
    return sorted(f for d in SCANNED for f in (REPO / d).rglob("*.py") if "__pycache__" not in f.parts)


def test_no_code_loads_pickle_or_evaluates_data():
    files = _python_files()
    assert len(files) > 100, f"scanned only {len(files)} files; is the tree where the test expects?"
    found = [hit for f in files for hit in unsafe_calls(f)]
    assert not found, "unsafe deserialisation or eval/exec:\n" + "\n".join(found)


PLANTED = """
import pickle, yaml, joblib, dill, marshal
import numpy as np
import pandas as pd
import torch as T
from pickle import loads as unpickle
from cloudpickle import load
pickle.load(f)
unpickle(b)
load(f)
T.load("m.pt")
T.load("m.pt", weights_only=False)
np.load("a.npz")
np.load("a.npz", allow_pickle=True)
pd.read_pickle("d.pkl")
joblib.load("m.joblib")
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
marshal.loads(b)
eval("1")
exec("x = 1")
# safe forms, never flagged
T.load("m.pt", weights_only=True)
np.load("a.npz", allow_pickle=False)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
"""


def test_the_scan_catches_planted_unsafe_calls(tmp_path):
    planted = tmp_path / "pkg" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(PLANTED)
    found = unsafe_calls(planted)
    names = [hit.split(": ", 1)[1] for hit in found]
    assert names == ["import dill", "pickle.load", "pickle.loads", "cloudpickle.load", "torch.load",
                     "torch.load", "numpy.load", "numpy.load", "pandas.read_pickle", "joblib.load",
                     "yaml.load", "yaml.load", "yaml.unsafe_load", "marshal.loads", "eval", "exec"], found


# ---------------------------------------------------------------------------------------------
# 2. Booby-trapped checkpoints are refused at every boundary that takes a user path


class Trap:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def traps(tmp_path) -> tuple[Path, dict[str, Path]]:
    """(marker, {kind: file}): pickle-based checkpoints whose loading would create marker."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "traps"
    d.mkdir()
    payload = {"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "trap": Trap(marker)}
    files = {"pt": d / "model.pt", "bin": d / "pytorch_model.bin", "pkl": d / "model.pkl",
             "safetensors": d / "disguised.safetensors"}
    torch.save(payload, files["pt"])
    torch.save(payload, files["bin"])
    files["pkl"].write_bytes(pickle.dumps(payload))
    files["safetensors"].write_bytes(files["pt"].read_bytes())  # a pickle under a safe name
    files["npz"] = d / "data.npz"
    np.savez(files["npz"], x=np.array([Trap(marker)], dtype=object), y=np.zeros(1, dtype=np.int64))
    files["pkl_as_npz"] = d / "raw.npz"
    files["pkl_as_npz"].write_bytes(pickle.dumps({"x": Trap(marker)}))
    # a model artifact directory whose model.safetensors is a pickle
    art = d / "artifact"
    art.mkdir()
    (art / "model.safetensors").write_bytes(files["pt"].read_bytes())
    (art / "meta.json").write_text(json.dumps({"format": "dense", "model": _spec()}))
    files["artifact"] = art
    return marker, files


def _spec() -> dict:
    from slimforge.checkpoint import model_spec
    from slimforge.models import MLPConfig

    return model_spec(MLPConfig(), (4,), 3)


def test_the_traps_are_armed(traps, tmp_path):
    marker, files = traps
    torch.load(files["pt"], weights_only=False)
    assert marker.exists(), "control: unpickling the trap must create the marker"
    marker.unlink()
    np.load(files["npz"], allow_pickle=True)["x"]
    assert marker.exists(), "control: the .npz object array must carry the payload"


def _refused(call, marker: Path, *expect: str) -> str:
    with pytest.raises((ArtifactError, ValueError)) as info:
        call()
    message = str(info.value)
    assert not marker.exists(), f"the payload ran: {message}"
    assert "\n" not in message, f"not a one-line error: {message!r}"
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    return message


@pytest.mark.parametrize("kind", ["pt", "bin", "pkl", "safetensors", "artifact"])
def test_pretrained_init_refuses_a_pickle(traps, kind):
    from tasks.train.inits.pretrained import load_pretrained

    marker, files = traps
    model = torch.nn.Linear(4, 3)
    _refused(lambda: load_pretrained(model, files[kind]), marker, files[kind].name)


@pytest.mark.parametrize("kind", ["pt", "bin", "pkl", "safetensors", "artifact"])
def test_merge_checkpoints_refuse_a_pickle(traps, tmp_path, kind):
    from tasks.merge.checkpoints import CheckpointInputs, open_inputs

    marker, files = traps
    base = tmp_path / "base.safetensors"
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, str(base))
    inputs = CheckpointInputs(base=str(base), models=[str(files[kind])])
    _refused(lambda: open_inputs(inputs), marker, "models[0]", files[kind].name)
    as_base = CheckpointInputs(base=str(files[kind]), models=[str(base)])
    _refused(lambda: open_inputs(as_base), marker, "base", files[kind].name)


@pytest.mark.parametrize("kind", ["npz", "pkl_as_npz"])
def test_ingest_file_source_refuses_a_pickle(traps, kind):
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.sources import load_file

    marker, files = traps
    cfg = IngestConfig(dataset="file", path=str(files[kind]))
    _refused(lambda: load_file(cfg), marker, str(files[kind]))


def test_ingest_refuses_a_pickle_suffix(traps):
    from tasks.ingest.config import IngestConfig

    marker, files = traps
    with pytest.raises(ValidationError, match=r"\.npz or \.parquet"):
        IngestConfig(dataset="file", path=str(files["pkl"]))
    assert not marker.exists()


def test_load_any_refuses_a_pickle(traps):
    from slimforge.checkpoint import load_any

    marker, files = traps
    _refused(lambda: load_any(files["artifact"]), marker, "model.safetensors")
