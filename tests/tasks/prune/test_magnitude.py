import torch
from torch import nn

from tasks.prune.magnitude import apply_masks, magnitude_masks, prunable


def _model():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_exact_sparsity_and_kept_dominate_pruned():
    model = _model()
    weights = prunable(model)
    masks = magnitude_masks(weights, 0.7, "global")
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(0.3 * total)
    kept_min = min(w.abs()[m].min() for w, m in zip(weights.values(), masks.values()))
    pruned_max = max(w.abs()[~m].max() for w, m in zip(weights.values(), masks.values()))
    assert kept_min >= pruned_max


def test_global_scope_prunes_a_scaled_layer_least():
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(10)
    masks = magnitude_masks(prunable(model), 0.5, "global")
    assert masks["0.weight"].float().mean() > masks["2.weight"].float().mean()


def test_layer_scope_and_biases_untouched():
    model = _model()
    bias = model[0].bias.clone()
    masks = magnitude_masks(prunable(model), 0.6, "layer")
    apply_masks(model, masks)
    for name, m in masks.items():
        assert m.sum().item() == round(0.4 * m.numel()), name
    assert torch.equal(model[0].bias, bias)
    assert int((model[0].weight == 0).sum()) == 600 - round(0.4 * 600)
