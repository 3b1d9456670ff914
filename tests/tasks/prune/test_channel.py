import pytest
import torch
from sklearn.datasets import load_digits

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.prune.channel import ChannelConfig, prune_channels
from tasks.prune.magnitude import apply_masks
from tasks.train.init import initialize

SHAPES = {"cnn": (1, 8, 8), "mlp": (64,)}


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data[:300], dtype=torch.float32) / 16
    return x


def _model(model_cfg, seed=0):
    model = build_model(model_cfg, SHAPES[model_cfg.arch], 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    with torch.no_grad():  # nonzero biases, so a dropped unit's bias would leak if it were kept
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def _inputs(x, model_cfg):
    return x.view(-1, 1, 8, 8) if model_cfg.arch == "cnn" else x


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


CONFIGS = [CNNConfig(channels=[8, 16], hidden=32), CNNConfig(channels=[6, 10], hidden=0),
           MLPConfig(hidden=[40, 24])]


@pytest.mark.parametrize("model_cfg", CONFIGS, ids=["cnn", "cnn-nohidden", "mlp"])
@pytest.mark.parametrize("strategy", ["greedy", "independent"])
def test_shrunk_model_equals_masked_original(digits, model_cfg, strategy):
    model = _model(model_cfg)
    out = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5, strategy=strategy))
    slim = build_model(out.config, SHAPES[model_cfg.arch], 10)
    slim.load_state_dict(out.state_dict)  # strict: same keys, sliced shapes
    slim.eval()
    x = _inputs(digits, model_cfg)
    dense_logits = model(x)
    apply_masks(model, out.masks)
    masked, shrunk = model(x), slim(x)
    diff = (masked - shrunk).abs().max().item()
    assert diff < 1e-6, f"max |masked - shrunk| = {diff}"
    assert (masked - dense_logits).abs().max() > 1e-3  # pruning did change the function


def test_parameter_count_drops_exactly_and_masks_cover_it():
    model_cfg = CNNConfig(channels=[8, 16], hidden=32)
    model = _model(model_cfg)
    out = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5))
    assert out.config == CNNConfig(channels=[4, 8], hidden=16)
    # 1x8x8 -> conv(1->4) -> pool 4x4 -> conv(4->8) -> pool 2x2 -> 8·2·2=32 -> 16 -> 10
    expected = (1 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + (32 * 16 + 16) + (16 * 10 + 10)
    slim = build_model(out.config, (1, 8, 8), 10)
    assert _n_params(slim) == expected == sum(t.numel() for t in out.state_dict.values())
    apply_masks(model, out.masks)
    # every parameter the slim model lacks is exactly zero in the masked original
    assert sum(int((p != 0).sum()) for p in model.parameters()) == expected


def test_lowest_l1_filters_dropped_and_head_kept():
    model_cfg = CNNConfig(channels=[8, 16], hidden=32)
    model = _model(model_cfg)
    conv = model.backbone.body[0]
    with torch.no_grad():
        conv.weight[5].mul_(100)  # the largest filter must survive
        conv.weight[2].mul_(1e-3)  # the smallest must go
    out = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5, strategy="independent"))
    for name, rows in out.kept.items():
        w = dict(model.named_modules())[name].weight
        l1 = w.abs().flatten(1).sum(1)
        dropped = torch.ones(len(l1), dtype=torch.bool)
        dropped[rows] = False
        assert l1[rows].min() >= l1[dropped].max(), name
    assert 5 in out.kept["backbone.body.0"].tolist() and 2 not in out.kept["backbone.body.0"].tolist()
    assert "head" not in out.kept
    assert out.state_dict["head.weight"].shape == (10, 16)
    assert torch.equal(out.state_dict["head.bias"], model.head.bias)


def test_greedy_scores_ignore_kernels_of_removed_channels():
    model_cfg = CNNConfig(channels=[2, 2], hidden=0)
    model = _model(model_cfg)
    with torch.no_grad():
        model.backbone.body[0].weight[0].mul_(1e-3)  # channel 0 of conv1 goes
        w = model.backbone.body[3].weight  # (2, 2, 3, 3)
        w.fill_(1.0)
        w[0, 0].fill_(10.0)  # filter 0 is large only through the removed input channel
    greedy = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5))
    independent = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5, strategy="independent"))
    assert independent.kept["backbone.body.3"].tolist() == [0]
    assert greedy.kept["backbone.body.3"].tolist() == [0]  # a tie (9 vs 9): lower index
    with torch.no_grad():
        w[1, 1].fill_(2.0)  # now filter 1 is larger on the surviving input channel
    greedy = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=0.5))
    assert greedy.kept["backbone.body.3"].tolist() == [1]


def test_keep_all_is_identity_and_original_untouched():
    model_cfg = MLPConfig(hidden=[40, 24])
    model = _model(model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = prune_channels(model, model_cfg, ChannelConfig(keep_fraction=1.0))
    assert out.config == model_cfg
    assert all(torch.equal(out.state_dict[k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(m.all() for m in out.masks.values())


def test_tiny_fraction_keeps_at_least_one_unit():
    model_cfg = MLPConfig(hidden=[40, 3])
    out = prune_channels(_model(model_cfg), model_cfg, ChannelConfig(keep_fraction=0.1))
    assert out.config.hidden == [4, 1]


def test_vit_is_refused_with_the_supported_archs():
    model_cfg = ViTConfig(patch=4, width=16, depth=1, heads=2, mlp=16)
    model = build_model(model_cfg, (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"'vit'.*cnn, mlp"):
        prune_channels(model, model_cfg, ChannelConfig())


def test_config_mismatch_is_refused():
    model = _model(MLPConfig(hidden=[40, 24]))
    with pytest.raises(ValueError, match="do not match"):
        prune_channels(model, MLPConfig(hidden=[40, 20]), ChannelConfig())
