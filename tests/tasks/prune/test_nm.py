import pytest
import torch
from pydantic import ValidationError

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.prune.common import PruneContext
from tasks.prune.magnitude import apply_masks, prunable
from tasks.prune.nm import NmConfig, nm_masks, prune_nm


def _randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _groups(t, m):
    """(O, ...) -> (O, K/m, m) along the input dimension in torch's flatten order."""
    return t.reshape(t.shape[0], -1).reshape(t.shape[0], -1, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
@pytest.mark.parametrize("shape", [(12, 16), (6, 8, 3, 3), (5, 8, 1, 1)])
def test_every_group_keeps_exactly_its_top_n(shape, n, m):
    w = _randn(shape)
    mask = nm_masks({"w": w}, n, m, skip=[])["w"]
    assert mask.shape == w.shape and mask.dtype == torch.bool
    pruned = w * mask
    g_abs, g_mask, g_pruned = _groups(w.abs(), m), _groups(mask, m), _groups(pruned, m)
    assert torch.all((g_pruned != 0).sum(-1) == n)
    kept_min = torch.where(g_mask, g_abs, torch.inf).amin(-1)
    dropped_max = torch.where(g_mask, -torch.inf, g_abs).amax(-1)
    assert torch.all(kept_min >= dropped_max)
    assert int(mask.sum()) * m == n * mask.numel()  # sparsity exactly 1 - n/m


def test_conv_groups_run_along_channel_major_flatten_order():
    # one filter, I=4 channels, 1x2 kernel. Torch order groups (ch0, ch1) and (ch2, ch3), so 2:4
    # keeps ch0's two taps and ch3's two taps. Channels-last grouping (ASP: along I at each tap)
    # would keep ch0 and ch1 instead.
    w = torch.tensor([[[[9.0, 8.0]], [[7.0, 6.0]], [[0.1, 0.2]], [[0.3, 0.4]]]])
    mask = nm_masks({"c": w}, 2, 4, skip=[])["c"]
    expected = torch.tensor([[[[True, True]], [[False, False]], [[False, False]], [[True, True]]]])
    assert torch.equal(mask, expected)


def test_ties_go_to_the_lower_index():
    mask = nm_masks({"w": torch.ones(3, 8)}, 2, 4, skip=[])["w"]
    row = torch.tensor([True, True, False, False] * 2)
    assert torch.equal(mask, row.expand(3, 8))


def test_indivisible_input_raises_a_clear_error_and_skip_lets_it_through():
    weights = {"fc.weight": _randn((8, 16)), "stem.weight": _randn((4, 1, 3, 3))}
    with pytest.raises(ValueError) as err:
        nm_masks(weights, 2, 4, skip=[])
    msg = str(err.value)
    assert "'stem.weight'" in msg and "9 inputs" in msg and "m=4" in msg and "skip" in msg
    with pytest.raises(ValueError, match=r"'fc.weight' has 10 inputs.*m=4"):
        nm_masks({"fc.weight": _randn((3, 10))}, 2, 4, skip=[])
    masks = nm_masks(weights, 2, 4, skip=["stem.weight"])
    assert masks["stem.weight"].all()
    assert masks["fc.weight"].float().mean().item() == 0.5


def test_default_skip_prunes_a_real_cnn_to_exactly_half_on_covered_layers():
    model = build_model(CNNConfig(channels=[8, 16], hidden=32), (1, 8, 8), 10)
    weights = prunable(model)
    cfg = NmConfig()
    assert "backbone.body.0.weight" in cfg.skip  # 1 channel x 3x3 = 9 inputs
    with pytest.raises(ValueError, match="backbone.body.0.weight"):
        nm_masks(weights, cfg.n, cfg.m, skip=[])
    masks = nm_masks(weights, cfg.n, cfg.m, cfg.skip)
    assert set(masks) == set(weights)
    bias = model.head.bias.clone()
    apply_masks(model, masks)
    for name, w in prunable(model).items():
        zeros = int((w == 0).sum())
        if name in cfg.skip:
            assert zeros == 0, name
        else:
            assert zeros == w.numel() // 2, name
            assert torch.all((_groups(w, 4) != 0).sum(-1) == 2), name
    assert torch.equal(model.head.bias, bias)


def test_mlp_has_no_stem_to_skip():
    model = build_model(MLPConfig(hidden=[32, 16]), (64,), 10)
    masks = nm_masks(prunable(model), 2, 4, NmConfig().skip)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept * 2 == total


def test_config_validates():
    assert (NmConfig().n, NmConfig().m) == (2, 4)
    with pytest.raises(ValidationError, match="below"):
        NmConfig(n=4, m=4)
    with pytest.raises(ValidationError):
        NmConfig(n=2, m=4, sparsity=0.5)


def test_registry_entry_applies_the_masks_and_names_the_dense_layers():
    arch = CNNConfig(channels=[8, 16], hidden=32)
    x = torch.rand(4, 1, 8, 8)
    ctx = PruneContext(model=build_model(arch, (1, 8, 8), 10), model_config=arch, input_shape=(1, 8, 8),
                       num_classes=10, x=x, y=torch.zeros(4, dtype=torch.long),
                       generator=torch.Generator())
    out = prune_nm(ctx, NmConfig())
    assert out.report == {"nm_pattern": "2:4", "nm_dense_layers": ["backbone.body.0.weight"]}
    head = out.model.head.weight
    assert torch.all((_groups(head, 4) != 0).sum(-1) == 2)
