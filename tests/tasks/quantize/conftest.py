"""Fixtures shared by the quantize tests: models trained briefly on sklearn digits
(digits_split lives in tests/tasks/conftest.py)."""

import copy

import pytest
import torch

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.quantize.attention import weight_key


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one intra-op thread."""


def _seeded(arch, input_shape: tuple[int, ...], num_classes: int, gen: torch.Generator) -> torch.nn.Module:
    """build_model with every parameter drawn from a uniform fan-in init on ``gen`` (no global RNG)."""
    model = build_model(arch, input_shape, num_classes)
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1 else 0.05
            p.uniform_(-bound, bound, generator=gen)
    return model


@pytest.fixture
def make_model():
    """make_model(arch config, input_shape, num_classes, seed=...) -> an untrained, seeded model."""
    return lambda arch, input_shape, num_classes, seed: _seeded(arch, input_shape, num_classes,
                                                                torch.Generator().manual_seed(seed))


@pytest.fixture
def dense_twin():
    """dense_twin(model, layers) -> a copy of ``model`` whose quantized layers hold their effective
    weight (dequantized codes, input scaling and low-rank correction folded in): the float function
    the packed model must compute. An attention's in-projection ``<attn>.in_proj`` is its in_proj_weight."""

    def twin(model: torch.nn.Module, layers: dict) -> torch.nn.Module:
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, layer in layers.items():
                w = ref.get_parameter(weight_key(ref, name))
                w.copy_(layer.effective_weight().reshape(w.shape))
        return ref

    return twin


def _trained(arch, digits_split, seed: int) -> torch.nn.Module:
    xtr, ytr, _, _ = digits_split
    gen = torch.Generator().manual_seed(seed)
    model = _seeded(arch, (64,), 10, gen)
    fit(model, xtr, ytr, FitConfig(epochs=6, batch_size=64, lr=3e-3), gen)
    return model.eval()


@pytest.fixture(scope="session")
def trained_mlp(digits_split) -> torch.nn.Module:
    """MLP 64-128-64-10, ~96% on the digits test split."""
    return _trained(MLPConfig(hidden=[128, 64]), digits_split, seed=0)


@pytest.fixture(scope="session")
def trained_cnn(digits_split) -> torch.nn.Module:
    """CNN on the 1×64 row image: conv 1→8, conv 8→16 (1×3 kernels), FC 256→32→10."""
    return _trained(CNNConfig(channels=[8, 16], hidden=32), digits_split, seed=1)


@pytest.fixture(scope="session")
def small_vit(digits_split) -> torch.nn.Module:
    """ViT on the 1×64 digit rows: 8 patches of 1×8, width 32, 2 blocks; trained briefly."""
    xtr, ytr, _, _ = digits_split
    gen = torch.Generator().manual_seed(2)
    model = build_model(ViTConfig(patch=8, width=32, depth=2, heads=2, mlp=64), (64,), 10)
    with torch.no_grad():  # a seeded init of every parameter, no global RNG
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.uniform_(-(p[0].numel() ** -0.5), p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.uniform_(-0.05, 0.05, generator=gen)
            else:  # LayerNorm gains
                p.fill_(1.0)
    fit(model, xtr, ytr, FitConfig(epochs=3, batch_size=64, lr=3e-3), gen)
    return model.eval()
