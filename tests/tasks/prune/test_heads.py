import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from slimforge.checkpoint import load_model, model_spec, save_model
from slimforge.config import ParamsError, validate_params
from slimforge.models import CNNConfig, SlimAttention, ViTConfig, build_model
from tasks.prune.common import PruneContext
from tasks.prune.heads import (
    HeadConfig,
    choose_heads,
    gate_gradients,
    gradient_importance,
    l1_importance,
    normalise_per_layer,
    prune_heads,
    prune_heads_of,
)
from tasks.train.init import initialize

SHAPE = (1, 8, 8)
VIT = ViTConfig(patch=4, width=16, depth=2, heads=4, mlp=16)  # 4 tokens, head_dim 4
HEAD_DIM = VIT.width // VIT.heads


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data[:200], dtype=torch.float32).view(-1, *SHAPE) / 16
    return x, torch.tensor(d.target[:200])


def _model(model_cfg=VIT, seed=0):
    model = build_model(model_cfg, SHAPE, 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero biases, so a removed head's q/k/v biases would leak if kept
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _slim(out, dtype=torch.float32):
    slim = build_model(out.config, SHAPE, 10).to(dtype)
    slim.load_state_dict(out.state_dict)  # strict: same keys, sliced shapes
    return slim.eval()


def _gated_to_zero(model, kept, kept_mlp=None):
    """The original model with every removed head's output gated to 0 (its out_proj columns
    zeroed) and every removed MLP unit silenced (its input row and bias zeroed; GELU(0) = 0)."""
    gated = copy.deepcopy(model)
    with torch.no_grad():
        for name, heads in kept.items():
            w = gated.get_submodule(name).out_proj.weight  # (width, heads·head_dim)
            removed = [h for h in range(w.shape[1] // HEAD_DIM) if h not in heads.tolist()]
            for h in removed:
                w[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        for name, units in (kept_mlp or {}).items():
            fc1 = gated.get_submodule(name)[0]
            removed = [u for u in range(fc1.out_features) if u not in units.tolist()]
            fc1.weight[removed] = 0
            fc1.bias[removed] = 0
    return gated


def _ctx(model, digits, model_cfg=VIT):
    x, y = digits
    return PruneContext(model, model_cfg, SHAPE, 10, x, y, torch.Generator().manual_seed(0))


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("importance", ["gradient", "l1"])
def test_shrunk_model_equals_the_original_with_removed_heads_gated_to_zero(digits, importance):
    x, y = digits[0].double(), digits[1]  # float64: float32 rounding differs between the two attention kernels
    model = _model().double()
    out = prune_heads_of(model, VIT, HeadConfig(keep_fraction=0.5, importance=importance), x, y,
                         torch.Generator().manual_seed(0))
    assert sum(out.config.block_heads) == 4
    shrunk, masked = _slim(out, torch.float64)(x), _gated_to_zero(model, out.kept)(x)
    diff = (shrunk - masked).abs().max().item()
    assert diff < 1e-6, f"max |shrunk - gated| = {diff}"
    assert (masked - model(x)).abs().max() > 1e-3  # pruning did change the function


def test_parameter_count_drops_by_exactly_the_removed_heads(digits):
    x, y = digits
    model = _model()
    out = prune_heads_of(model, VIT, HeadConfig(keep_fraction=0.25), x, y, torch.Generator().manual_seed(0))
    removed = VIT.depth * VIT.heads - sum(out.config.block_heads)
    assert removed == 6  # keep max(depth, round(0.25·8)) = 2 of 8
    per_head = 3 * HEAD_DIM * VIT.width + 3 * HEAD_DIM + VIT.width * HEAD_DIM  # q/k/v rows, their biases, out_proj columns
    slim = _slim(out)
    assert _n_params(model) - _n_params(slim) == removed * per_head
    assert all(isinstance(b.attn, SlimAttention) for b in slim.backbone.blocks)


def test_every_block_keeps_a_head_and_the_cut_is_global():
    scores = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([0.1, 0.2, 0.3, 0.05])}
    kept = choose_heads(scores, 0.5)  # 4 of 8: b's best is reserved, the other 3 places all go to a
    assert kept["a"].tolist() == [0, 1, 2] and kept["b"].tolist() == [2]
    kept = choose_heads(scores, 0.01)  # round(0.08) = 0 -> one per block
    assert kept["a"].tolist() == [0] and kept["b"].tolist() == [2]
    assert [len(v) for v in choose_heads(scores, 1.0).values()] == [4, 4]
    ties = choose_heads({"a": torch.ones(4), "b": torch.ones(4)}, 0.5)
    assert ties["a"].tolist() == [0, 1, 2] and ties["b"].tolist() == [0]  # ties: lower (layer, head)


def test_tiny_fraction_keeps_one_head_per_block(digits):
    x = digits[0]
    pruned = prune_heads(_ctx(_model(), digits), HeadConfig(keep_fraction=0.01, importance="l1"))
    assert pruned.model_config.block_heads == [1, 1]
    assert pruned.model(x).shape == (len(x), 10)


def test_gate_gradients_equal_finite_differences_per_example(digits):
    """∂L(x)/∂ξ_h against central differences of L(x) with head h's output scaled by 1 ± ε (float64)."""
    x, y = digits[0][:6].double(), digits[1][:6]
    model = _model().double()
    grads = gate_gradients(model, VIT, x, y)
    eps = 1e-5
    for name, g in grads.items():
        assert g.shape == (6, VIT.heads)
        for h in range(VIT.heads):
            losses = []
            for scale in (1 + eps, 1 - eps):
                gated = copy.deepcopy(model)
                with torch.no_grad():
                    gated.get_submodule(name).out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] *= scale
                losses.append(F.cross_entropy(gated(x), y, reduction="none"))
            fd = (losses[0] - losses[1]) / (2 * eps)  # (6,)
            torch.testing.assert_close(g[:, h], fd, rtol=1e-6, atol=1e-9)
    importance = gradient_importance(model, VIT, x, y)
    for name, g in grads.items():  # eq. 2: |·| per example, then the mean
        torch.testing.assert_close(importance[name], g.abs().mean(0))
    assert any((g > 0).any() and (g < 0).any() for g in grads.values())  # the |·| per example matters


def test_gate_gradients_do_not_depend_on_the_batch_split(digits, monkeypatch):
    x, y = digits
    model = _model()
    whole = gate_gradients(model, VIT, x[:40], y[:40])
    monkeypatch.setattr("tasks.prune.heads.BATCH", 7)
    split = gate_gradients(model, VIT, x[:40], y[:40])
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], rtol=1e-5, atol=1e-7)


def test_l1_importance_sums_the_heads_qkv_rows_and_out_proj_columns():
    model = _model()
    scores = l1_importance(model, VIT)
    attn = model.backbone.blocks[1].attn
    inner = VIT.width
    h = 2
    rows = [part * inner + h * HEAD_DIM + i for part in range(3) for i in range(HEAD_DIM)]
    expected = attn.in_proj_weight[rows].abs().sum() + attn.out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].abs().sum()
    torch.testing.assert_close(scores["backbone.blocks.1.attn"][h], expected)


def test_scores_are_normalised_per_layer_and_the_lowest_heads_go(digits):
    x, y = digits
    model = _model()
    with torch.no_grad():  # head 3 of block 0 reads through almost-zero q/k/v rows and out_proj columns
        attn = model.backbone.blocks[0].attn
        for part in range(3):
            attn.in_proj_weight[part * VIT.width + 3 * HEAD_DIM : part * VIT.width + 4 * HEAD_DIM] *= 1e-3
        attn.out_proj.weight[:, 3 * HEAD_DIM :] *= 1e-3
    for importance in ("gradient", "l1"):
        out = prune_heads_of(model, VIT, HeadConfig(keep_fraction=0.75, importance=importance), x, y,
                             torch.Generator().manual_seed(0))
        for name, s in out.importance.items():
            assert s.norm().item() == pytest.approx(1.0, abs=1e-6), name
        assert 3 not in out.kept["backbone.blocks.0.attn"].tolist(), importance
        kept, dropped = [], []
        for name, s in out.importance.items():
            is_kept = torch.zeros(len(s), dtype=torch.bool).index_fill_(0, out.kept[name], True)
            kept.append(s[is_kept])
            dropped.append(s[~is_kept])
        assert torch.cat(kept).min() >= torch.cat(dropped).max()  # every kept head scores at least every removed one
    assert normalise_per_layer({"z": torch.zeros(3)})["z"].tolist() == [0.0, 0.0, 0.0]


def test_keep_all_is_the_identity_and_the_original_is_untouched(digits):
    x, y = digits
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = prune_heads_of(model, VIT, HeadConfig(keep_fraction=1.0), x, y, torch.Generator().manual_seed(0))
    assert out.config.block_heads == [4, 4] and out.config.block_mlp == [16, 16]
    assert all(torch.equal(out.state_dict[k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    slim = _slim(out)
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in slim.backbone.blocks)
    assert torch.equal(slim(x), model(x))


def test_the_artifact_round_trips_as_the_smaller_model(tmp_path, digits):
    x, _ = digits
    pruned = prune_heads(_ctx(_model(), digits), HeadConfig(keep_fraction=0.5))
    spec = model_spec(pruned.model_config, SHAPE, 10)
    assert spec["config"]["block_heads"] == pruned.model_config.block_heads
    save_model(tmp_path, pruned.model.state_dict(), spec, root=tmp_path, stage="prune", method="heads",
               config=HeadConfig().model_dump(mode="json"), seed=0, parents={})
    loaded = load_model(tmp_path)
    assert _n_params(loaded) == _n_params(pruned.model) < _n_params(_model())
    assert torch.equal(loaded(x), pruned.model(x))
    assert set(pruned.report) == {"kept_heads", "head_importance", "kept_mlp_units"}
    assert sum(pruned.report["kept_heads"].values()) == 4


def test_mlp_units_shrunk_model_equals_the_masked_original_and_counts_drop(digits):
    x, y = digits[0].double(), digits[1]
    model = _model().double()
    cfg = HeadConfig(keep_fraction=0.5, mlp_keep_fraction=0.3)
    out = prune_heads_of(model, VIT, cfg, x, y, torch.Generator().manual_seed(0))
    assert out.config.block_mlp == [5, 5]  # max(1, round(0.3·16))
    slim = _slim(out, torch.float64)
    diff = (slim(x) - _gated_to_zero(model, out.kept, out.kept_mlp)(x)).abs().max().item()
    assert diff < 1e-6, diff
    per_head = 3 * HEAD_DIM * VIT.width + 3 * HEAD_DIM + VIT.width * HEAD_DIM
    per_unit = VIT.width + 1 + VIT.width  # fc1 row and bias, fc2 column
    assert _n_params(model) - _n_params(slim) == 4 * per_head + 2 * (16 - 5) * per_unit
    for name, units in out.kept_mlp.items():  # the lowest-L1 units went
        l1 = model.get_submodule(name)[0].weight.abs().sum(1)
        dropped = torch.ones(len(l1), dtype=torch.bool).index_fill_(0, units, False)
        assert l1[units].min() >= l1[dropped].max(), name


def test_head_pruning_of_an_already_pruned_vit(digits):
    x, y = digits[0].double(), digits[1]
    cfg = VIT.model_copy(update={"block_heads": [3, 2], "block_mlp": [9, 16]})
    model = _model(cfg).double()
    out = prune_heads_of(model, cfg, HeadConfig(keep_fraction=0.5, mlp_keep_fraction=0.5), x, y,
                         torch.Generator().manual_seed(0))
    assert sum(out.config.block_heads) == round(0.5 * 5) and min(out.config.block_heads) >= 1
    assert out.config.block_mlp == [4, 8]  # round(4.5) = 4, half to even
    diff = (_slim(out, torch.float64)(x) - _gated_to_zero(model, out.kept, out.kept_mlp)(x)).abs().max().item()
    assert diff < 1e-6, diff


def test_a_cnn_is_refused_naming_channel_pruning(digits):
    model_cfg = CNNConfig(channels=[4], hidden=0)
    with pytest.raises(ValueError, match=r"'cnn'.*prune.method: channel"):
        prune_heads(_ctx(_model(model_cfg), digits, model_cfg), HeadConfig())


# --- the model side: ViTConfig.block_heads and SlimAttention ---

def test_unpruned_vit_state_dict_is_unchanged():
    model = build_model(ViTConfig(patch=4, width=16, depth=1, heads=2, mlp=8), SHAPE, 10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "backbone.pos": (1, 4, 16), "backbone.embed.weight": (16, 1, 4, 4), "backbone.embed.bias": (16,),
        "backbone.blocks.0.norm1.weight": (16,), "backbone.blocks.0.norm1.bias": (16,),
        "backbone.blocks.0.attn.in_proj_weight": (48, 16), "backbone.blocks.0.attn.in_proj_bias": (48,),
        "backbone.blocks.0.attn.out_proj.weight": (16, 16), "backbone.blocks.0.attn.out_proj.bias": (16,),
        "backbone.blocks.0.norm2.weight": (16,), "backbone.blocks.0.norm2.bias": (16,),
        "backbone.blocks.0.mlp.0.weight": (8, 16), "backbone.blocks.0.mlp.0.bias": (8,),
        "backbone.blocks.0.mlp.2.weight": (16, 8), "backbone.blocks.0.mlp.2.bias": (16,),
        "backbone.norm.weight": (16,), "backbone.norm.bias": (16,), "head.weight": (10, 16), "head.bias": (10,)}
    assert isinstance(model.backbone.blocks[0].attn, nn.MultiheadAttention)
    dumped = ViTConfig().model_dump(mode="json")
    assert "block_heads" not in dumped and "block_mlp" not in dumped  # an unpruned spec is as before


def test_slim_attention_with_all_heads_equals_multihead_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    slim = SlimAttention(16, 4, 4)
    assert {k: v.shape for k, v in slim.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}
    with torch.no_grad():
        mha.in_proj_bias.normal_(generator=torch.Generator().manual_seed(0))
    slim.load_state_dict(mha.state_dict())
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    want = mha(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(slim(q, kv, kv)[0], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="need_weights"):
        slim(q, q, q, need_weights=True)


@pytest.mark.parametrize("key,value,limit", [
    ("block_heads", [4], "1..4"), ("block_heads", [4, 4, 4], "1..4"), ("block_heads", [0, 4], "1..4"),
    ("block_heads", [5, 1], "1..4"), ("block_mlp", [16], "1..16"), ("block_mlp", [0, 16], "1..16"),
    ("block_mlp", [8, 17], "1..16")])
def test_bad_block_counts_are_one_line_naming_the_key(key, value, limit):
    raw = {"train": {"model": {"arch": "vit", "depth": 2, "heads": 4, "mlp": 16, key: value}}}
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"params.yaml: train.model.{key}: "), message
    assert "depth" in message and limit in message


def test_default_and_vit_params_validate():
    validate_params({}, "params.yaml")
    params = validate_params({"train": {"model": {"arch": "vit", "depth": 2, "block_heads": [1, 4],
                                                   "block_mlp": [8, 128]}}}, "p")
    assert params.train.model.block_heads == [1, 4] and params.train.model.block_mlp == [8, 128]
    assert validate_params({"prune": {"method": "heads", "keep_fraction": 0.5}}, "p").prune.method == "heads"
