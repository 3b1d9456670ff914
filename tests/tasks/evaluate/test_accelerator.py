"""The gpu_* columns: each artifact timed again on the accelerator, a packed one reloaded there.

CI has no GPU, so the plumbing is checked with the CPU standing in as the accelerator (the
columns appear, the packed model is rebuilt on the low-bit ops, quality is still measured
once); the last test runs the real thing when CUDA is present.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from slimforge.artifacts import WEIGHTS, write_meta
from slimforge.checkpoint import load_any, model_spec, save_model
from slimforge.models import MLPConfig, build_model
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.schema import validate_summary
from tasks.evaluate.stage import Harness, accelerator
from tasks.quantize import quantize_model, save_packed
from tasks.quantize.rtn import RtnConfig

SHAPE, CLASSES = (1, 8, 8), 10
GPU_COLUMNS = {"gpu_latency_ms_b1", "gpu_latency_ms_b256", "gpu_peak_memory_bytes"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ws")
    arch = MLPConfig(hidden=[64])
    model = build_model(arch, SHAPE, CLASSES).eval()
    spec = model_spec(arch, SHAPE, CLASSES)
    dense, packed = root / "dense", root / "packed"
    dense.mkdir()
    save_model(dense, model.state_dict(), spec, root=root, stage="train", method="kaiming", config={}, seed=0,
               parents={})
    packed.mkdir()
    cfg = RtnConfig(name="int4", bits=4, granularity="group", group_size=32)
    save_packed(packed / WEIGHTS, quantize_model(model, cfg), cfg)
    write_meta(packed, root=root, stage="quantize", method="rtn", config={}, seed=0, parents={},
               extra={"model": spec, "format": "packed"})
    return {"train": dense, "quantize/int4": packed}


def _harness(device) -> Harness:
    cfg = EvaluateConfig(latency_batches=(1, 16), latency_repeats=2, latency_warmup=0, bootstrap=100)
    g = torch.Generator().manual_seed(0)
    return Harness(cfg, torch.rand(40, *SHAPE, generator=g), torch.randint(0, CLASSES, (40,), generator=g),
                   CLASSES, device)


def test_without_an_accelerator_there_are_no_gpu_columns(artifacts):
    h = _harness(None)
    row = h.add("train", artifacts["train"], "test", load_any(artifacts["train"]))
    assert not GPU_COLUMNS & set(row)


def test_every_artifact_gets_gpu_columns_and_a_packed_one_is_rebuilt_on_the_device(artifacts, monkeypatch):
    h = _harness(torch.device("cpu"))  # the CPU standing in for a GPU
    reloaded = []
    real = load_any

    def spy(directory, device="cpu"):
        reloaded.append((Path(directory).name, torch.device(device)))
        return real(directory, device)

    monkeypatch.setattr("tasks.evaluate.stage.load_any", spy)
    for name, directory in artifacts.items():
        h.add(name, directory, "test", load_any(directory))
    summary = validate_summary(pd.DataFrame(h.rows))
    assert GPU_COLUMNS <= set(summary.columns)
    assert (summary.gpu_latency_ms_b1 > 0).all() and (summary.gpu_peak_memory_bytes > 0).all()
    assert reloaded == [("packed", torch.device("cpu"))], "only the packed model is loaded again; a dense one is copied"


def test_auto_picks_cuda_only_when_present():
    assert accelerator("off") is None
    assert accelerator("auto") == (torch.device("cuda") if torch.cuda.is_available() else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_the_packed_model_runs_there(artifacts):
    h = _harness(torch.device("cuda"))
    row = h.add("quantize/int4", artifacts["quantize/int4"], "test", load_any(artifacts["quantize/int4"]))
    assert row["gpu_latency_ms_b1"] > 0 and row["gpu_peak_memory_bytes"] > 0
    on_gpu = load_any(artifacts["quantize/int4"], "cuda")
    assert any(getattr(m, "is_packed", False) for m in on_gpu.modules())
    assert all(b.device.type == "cuda" for b in on_gpu.buffers())
