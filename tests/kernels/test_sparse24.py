"""kernels/sparse24.py: 2:4 detection, the reference Sparse24Linear against nn.Linear, and the
semi-structured path against the dense fp16 layer (CUDA, compute capability >= 8.0 only); plus
the load_any / evaluate wiring that runs a 2:4-pruned artifact on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kernels.sparse24 import (
    Sparse24Linear,
    is_2to4,
    resolve_sparse24_kernel,
    semi_structured_supported,
    sparsify_24,
)
from slimforge.checkpoint import load_any, model_spec, pruned_2to4, save_model
from slimforge.models import MLPConfig, build_model
from tasks.prune.common import prunable
from tasks.prune.magnitude import apply_masks
from tasks.prune.nm import STEMS, nm_masks

SEMI = semi_structured_supported("cuda") if torch.cuda.is_available() else False
needs_semi = pytest.mark.skipif(not SEMI, reason="needs CUDA with compute capability >= 8.0")
SHAPE, CLASSES = (1, 8, 8), 10


def _linear(i: int, o: int, seed: int = 0, bias: bool = True, prune: bool = True) -> nn.Linear:
    """nn.Linear(i, o) with a seeded init, 2:4-pruned by the nm method's own mask."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(o, i, generator=g) / i**0.5)
        if bias:
            layer.bias.copy_(torch.randn(o, generator=g))
        if prune:
            layer.weight.mul_(nm_masks({"w": layer.weight}, 2, 4, skip=[])["w"])
    return layer


def test_an_nm_mask_is_2to4_and_one_extra_nonzero_breaks_it():
    layer = _linear(64, 24)
    assert is_2to4(layer.weight)
    w = layer.weight.detach().clone()
    zero = (w[5, 8:12] == 0).nonzero()[0, 0]  # a pruned slot in row 5, group 2
    w[5, 8 + zero] = 0.5
    assert not is_2to4(w)
    assert not is_2to4(torch.zeros(4, 6)), "6 inputs cannot be grouped in 4s"
    assert is_2to4(torch.zeros(3, 8)), "an all-zero weight is trivially 2:4"


@pytest.mark.parametrize("i,o,bias", [(784, 37, True), (64, 10, False), (4, 1, True)])
def test_the_reference_equals_the_dense_layer_exactly(i, o, bias):
    layer = _linear(i, o, bias=bias)
    sparse = Sparse24Linear.from_linear(layer, "torch")
    x = torch.randn(3, 5, i, generator=torch.Generator().manual_seed(1))  # (B, T, I)
    with torch.no_grad():
        assert torch.equal(sparse(x), layer(x))


def test_a_weight_that_is_not_2to4_is_refused_naming_the_layer():
    layer = _linear(16, 8, prune=False)
    with pytest.raises(ValueError, match=r"'blocks\.0\.fc'.*not 2:4 sparse.*groups of 4 inputs"):
        Sparse24Linear.from_linear(layer, "torch", name="blocks.0.fc")
    with pytest.raises(ValueError, match=r"'odd'.*not a multiple of 4"):
        Sparse24Linear.from_linear(_linear(6, 2, prune=False), "torch", name="odd")


def test_kernel_settings_resolve_in_one_place():
    assert resolve_sparse24_kernel("torch", "cpu") == "torch"
    assert resolve_sparse24_kernel("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="'semi' needs a CUDA device"):
        resolve_sparse24_kernel("semi", "cpu")
    with pytest.raises(ValueError, match="'triton' is not one of auto, torch, semi"):
        resolve_sparse24_kernel("triton", "cpu")


def test_sparsify_on_cpu_replaces_nothing_with_auto_and_only_2to4_layers_with_torch():
    model = nn.Sequential(_linear(64, 32), nn.ReLU(), _linear(32, 16, prune=False), nn.ReLU(), _linear(16, 4))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        assert sparsify_24(model) == []
        assert all(type(m) is not Sparse24Linear for m in model.modules())
        assert sparsify_24(model, "torch") == ["0", "4"]
        assert isinstance(model[0], Sparse24Linear) and type(model[2]) is nn.Linear
        assert torch.equal(model(x), before)


def _nm_artifact(root: Path, method: str = "nm") -> Path:
    """A tiny MLP pruned 2:4 by the nm method, saved as the prune stage saves it."""
    arch = MLPConfig(hidden=[64])
    model = build_model(arch, SHAPE, CLASSES).eval()
    apply_masks(model, nm_masks(prunable(model), 2, 4, skip=STEMS))
    d = root / method
    d.mkdir()
    save_model(d, model.state_dict(), model_spec(arch, SHAPE, CLASSES), root=root, stage="prune", method=method,
               config={"method": "nm", "n": 2, "m": 4, "skip": STEMS}, seed=0, parents={}, format="sparse")
    return d


def test_a_2to4_artifact_still_loads_dense_on_cpu(tmp_path):
    d = _nm_artifact(tmp_path)
    from slimforge.artifacts import read_meta

    assert pruned_2to4(read_meta(d))
    assert not pruned_2to4(read_meta(_nm_artifact(tmp_path, "random_like"))), "the random baseline is not 2:4"
    model = load_any(d)
    assert all(type(m) is not Sparse24Linear for m in model.modules())
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert linears and all(is_2to4(m.weight) for m in linears)


def test_the_harness_reloads_a_2to4_artifact_on_the_accelerator(tmp_path, monkeypatch):
    from tasks.evaluate.config import EvaluateConfig
    from tasks.evaluate.stage import Harness

    d = _nm_artifact(tmp_path)
    reloaded = []
    monkeypatch.setattr("tasks.evaluate.stage.load_any",
                        lambda directory, device="cpu": reloaded.append(Path(directory).name) or load_any(directory, device))
    cfg = EvaluateConfig(latency_batches=(1, 4), latency_repeats=1, latency_warmup=0, bootstrap=100)
    g = torch.Generator().manual_seed(0)
    h = Harness(cfg, torch.rand(8, *SHAPE, generator=g), torch.randint(0, CLASSES, (8,), generator=g), CLASSES,
                torch.device("cpu"))  # the CPU standing in for a GPU
    row = h.add("prune", d, "test", load_any(d))
    assert reloaded == ["nm"] and row["gpu_latency_ms_b1"] > 0


@needs_semi
@pytest.mark.parametrize("i,o,batch", [(784, 37, 1), (4096, 4096, 5), (64, 10, 33)])
def test_semi_structured_matches_the_dense_fp16_layer(i, o, batch):
    layer = _linear(i, o, seed=3).half().cuda()
    sparse = Sparse24Linear.from_linear(layer, "semi")
    assert isinstance(sparse.weight, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(batch, 2, i, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref, out = layer(x), sparse(x)
    diff = (ref.float() - out.float()).abs().max().item()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=1e-2), f"max |diff| {diff:.3e}"


@needs_semi
def test_semi_refuses_an_input_size_torch_cannot_take_and_sparsify_leaves_it_dense():
    layer = _linear(100, 32).half().cuda()  # 100 inputs: 2:4, but not a multiple of 16 (or 64)
    with pytest.raises(ValueError, match=r"'fc'.*cannot run semi-structured.*100 inputs"):
        Sparse24Linear.from_linear(layer, "semi", name="fc")
    model = nn.Sequential(layer, nn.ReLU(), _linear(32, 16).half().cuda())
    assert sparsify_24(model) == ["2"]


@needs_semi
def test_load_any_on_the_gpu_runs_a_2to4_artifact_semi_structured(tmp_path):
    d = _nm_artifact(tmp_path)
    cpu, gpu = load_any(d), load_any(d, "cuda")
    replaced = [m for m in gpu.modules() if isinstance(m, Sparse24Linear)]
    assert replaced and all(isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor) for m in replaced)
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = cpu(x), gpu(x.cuda()).cpu()
    assert out.dtype == ref.dtype
    assert torch.allclose(out, ref, atol=5e-2, rtol=1e-2), f"max |diff| {(out - ref).abs().max().item():.3e}"
