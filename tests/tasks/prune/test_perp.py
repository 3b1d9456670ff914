import copy

import pytest
import torch
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.prune.common import Pruned
from tasks.prune.magnitude import MagnitudeConfig, apply_masks, magnitude_masks, prunable
from tasks.prune.perp import add_masked_adapters, merge_masked_adapters
from tasks.prune.stage import recover
from tasks.train.init import initialize

ARCHS = {"mlp": MLPConfig(hidden=[32]), "cnn": CNNConfig(channels=[4, 8], hidden=16),
         "vit": ViTConfig(patch=4, width=16, depth=1, heads=2, mlp=16)}


def _pruned(arch: str, sparsity: float = 0.7, seed: int = 0):
    model = build_model(ARCHS[arch], (64,), 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    masks = magnitude_masks(prunable(model), sparsity, "global")
    apply_masks(model, masks)
    return model.eval(), masks


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapters_start_as_the_pruned_model_and_merge_into_its_forward_and_mask(arch):
    model, masks = _pruned(arch)
    x = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    before, names = model(x), list(model.state_dict())
    params = add_masked_adapters(model, masks, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(2))
    assert len(params) == 2 * len(masks)
    assert torch.equal(model(x), before)  # B = 0: step 0 is the pruned model exactly
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    adapted = model(x)
    assert not torch.allclose(adapted, before)  # the adapters act, out_proj's included for the vit
    weights = {n: w.detach().clone() for n, w in prunable(model).items()}  # W_eff via the parametrization
    merge_masked_adapters(model)
    assert list(model.state_dict()) == names
    assert all(type(m) in (nn.Linear, nn.Conv2d, nn.modules.linear.NonDynamicallyQuantizableLinear)
               for n, m in model.named_modules() if f"{n}.weight" in masks)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    for name, w in prunable(model).items():
        assert torch.equal(w, weights[name])
        assert torch.equal(w != 0, masks[name]), name  # exactly the mask: zeros kept, survivors nonzero


def test_the_merge_is_w_plus_scaled_masked_ba():
    model, masks = _pruned("mlp")
    w0 = _state(model)["backbone.1.weight"]
    (A, B, *_) = add_masked_adapters(model, masks, rank=2, alpha=5.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(1)))
    merge_masked_adapters(model)
    expected = w0 + 2.5 * (B @ A).detach() * masks["backbone.1.weight"]
    torch.testing.assert_close(model.backbone[1].weight, expected, rtol=0, atol=1e-6)
    assert model.backbone[1].weight.requires_grad


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_perp_lora_recovery_moves_the_weights_and_keeps_the_mask_where_perp_keeps_the_weights(digits_split, arch):
    xtr, ytr, _, _ = digits_split
    fc = {"epochs": 1, "batch_size": 100, "lr": 1e-2}
    pruned, masks = _pruned(arch)
    start = _state(pruned)
    moved = {}
    for mode in ("perp", "perp_lora"):
        model = copy.deepcopy(pruned)
        cfg = MagnitudeConfig(recovery_params=mode, recovery=fc)
        recover(Pruned(model, masks), cfg, xtr, ytr, torch.Generator().manual_seed(0))
        assert list(model.state_dict()) == list(start)
        for name, w in prunable(model).items():
            assert torch.equal(w != 0, masks[name]), f"{mode}: {name} changed its sparsity pattern"
        moved[mode] = [n for n, w in prunable(model).items() if not torch.equal(w, start[n])]
        biases = [n for n in start if n.endswith("bias")]
        assert all(not torch.equal(model.state_dict()[n], start[n]) for n in biases), f"{mode}: biases not trained"
    assert moved["perp"] == []
    assert moved["perp_lora"] == list(masks)


def test_perp_lora_recovery_trains(digits_split):
    xtr, ytr, _, _ = digits_split
    model, masks = _pruned("mlp", sparsity=0.9)
    fit(model, xtr, ytr, FitConfig(epochs=1, batch_size=100), torch.Generator().manual_seed(0),
        after_step=lambda m: apply_masks(m, masks))
    loss = torch.nn.functional.cross_entropy
    before = loss(model(xtr), ytr).item()
    cfg = MagnitudeConfig(recovery_params="perp_lora", recovery_lora_rank=4, recovery_lora_alpha=8,
                          recovery={"epochs": 3, "batch_size": 100, "lr": 1e-2})
    recover(Pruned(model, masks), cfg, xtr, ytr, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert loss(model(xtr), ytr).item() < before


@pytest.mark.parametrize("key", ["recovery_lora_rank", "recovery_lora_alpha"])
def test_lora_settings_without_perp_lora_are_refused(key):
    with pytest.raises(ValueError, match=f"prune.{key}: set only with recovery_params: perp_lora"):
        MagnitudeConfig(recovery_params="perp", **{key: 4})
    assert getattr(MagnitudeConfig(recovery_params="perp_lora", **{key: 4}), key) == 4
