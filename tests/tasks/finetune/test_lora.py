import copy
import math

import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits

from slimforge.config import load_params
from slimforge.models import MLPConfig, ViTConfig, build_model
from slimforge.training import FitConfig, accuracy, fit
from slimforge.transforms import hflip
from tasks.finetune import FinetuneConfig, finetune, finetune_with_history
from tasks.finetune.lora import LoRALinear, add_adapters, match_targets, merge_adapters


def _kaiming(model, g):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model


def _mlp(seed=0, hidden=(16, 12)):
    model = build_model(MLPConfig(hidden=list(hidden)), (1, 4, 4), 5)
    return _kaiming(model, torch.Generator().manual_seed(seed))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_step0_output_equals_the_base_exactly():
    base = _mlp()
    x, _ = _data()
    model = _mlp()
    add_adapters(model, ["backbone.*"], 3, 6.0, g=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), base(x))


def test_adapters_freeze_the_base_and_return_adapter_and_head_params():
    model = _mlp()
    params = add_adapters(model, ["backbone.*"], 3, 6.0, g=torch.Generator().manual_seed(0))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 and not isinstance(model.head, LoRALinear)
    expected = [p for m in wrapped for p in (m.lora_A, m.lora_B)] + list(model.head.parameters())
    assert [id(p) for p in params] == [id(p) for p in expected]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "backbone.1.lora_A", "backbone.1.lora_B", "backbone.3.lora_A", "backbone.3.lora_B",
        "head.weight", "head.bias"}
    for m in wrapped:
        assert m.lora_A.shape == (3, m.base.in_features) and m.lora_B.shape == (m.base.out_features, 3)
        assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
        assert m.lora_A.abs().max() <= 1 / math.sqrt(m.base.in_features)  # kaiming_uniform(a=√5)


def test_random_init_comes_from_the_generator():
    a, b, c = _mlp(), _mlp(), _mlp()
    for m, seed in ((a, 0), (b, 0), (c, 1)):
        add_adapters(m, ["backbone.1"], 2, 4.0, g=torch.Generator().manual_seed(seed))
    assert torch.equal(a.backbone[1].lora_A, b.backbone[1].lora_A)
    assert not torch.equal(a.backbone[1].lora_A, c.backbone[1].lora_A)


def test_merged_and_adapter_forwards_agree_after_training():
    model = _mlp()
    x, y = _data()
    g = torch.Generator().manual_seed(0)
    params = add_adapters(model, ["backbone.*"], {"backbone.1": 4, "backbone.3": 2}, 8.0, g=g)
    fit(model, x, y, FitConfig(lr=1e-2, epochs=3, batch_size=16), g, params=params, label="test")
    assert model.backbone[1].lora_B.abs().max() > 0
    adapted = model(x)
    merged = merge_adapters(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_merged_state_dict_has_the_base_keys_and_only_adapted_layers_and_head_change():
    base = _mlp()
    x, y = _data()
    cfg = FinetuneConfig(method="lora", lora_targets=["backbone.3"], lr=1e-2, epochs=2, batch_size=16)
    model = finetune(base, x, y, cfg, torch.Generator().manual_seed(0))
    before, after = base.state_dict(), model.state_dict()
    assert list(after) == list(before)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"backbone.3.weight", "head.weight", "head.bias"}
    assert type(model.backbone[3]) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())


def test_rank_zero_means_no_adapter_and_bad_rank_dicts_are_rejected():
    model = _mlp()
    add_adapters(model, ["backbone.*"], {"backbone.1": 0, "backbone.3": 2}, 4.0, g=torch.Generator())
    assert type(model.backbone[1]) is torch.nn.Linear and isinstance(model.backbone[3], LoRALinear)
    with pytest.raises(ValueError, match="missing"):
        add_adapters(_mlp(), ["backbone.*"], {"backbone.1": 2}, 4.0, g=torch.Generator())
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        add_adapters(_mlp(), ["backbone.1"], 2, 4.0, {"backbone.1": torch.zeros(3, 16)})


def test_unknown_target_pattern_names_the_pattern_and_lists_linear_layers():
    with pytest.raises(ValueError, match=r"'encoder\.\*'.*\['backbone\.1', 'backbone\.3'\]"):
        add_adapters(_mlp(), ["backbone.*", "encoder.*"], 2, 4.0, g=torch.Generator())
    with pytest.raises(ValueError, match="'head'"):
        match_targets(_mlp(), ["head"])
    assert match_targets(_mlp(), ["*"]) == ["backbone.1", "backbone.3"]


def test_vit_adapts_mlp_linears_and_leaves_attention_out_proj_alone():
    model = build_model(ViTConfig(patch=2, width=8, depth=1, heads=2, mlp=8), (1, 4, 4), 3)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    # torch's attention rounds differently (~1 ulp) once in_proj_weight is frozen, so the
    # reference is the base frozen the same way add_adapters freezes it
    frozen = copy.deepcopy(model).requires_grad_(False)
    frozen.head.requires_grad_(True)
    add_adapters(model, ["backbone.*"], 2, 4.0, g=torch.Generator().manual_seed(0))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["backbone.blocks.0.mlp.0", "backbone.blocks.0.mlp.2"]
    assert torch.equal(model(x), frozen(x))


def test_config_keeps_existing_params_valid_and_rejects_lora_fields_elsewhere():
    for path in ("params/default.yaml", "params/tiny.yaml"):
        assert load_params(path).finetune.method in ("full", "head")
    FinetuneConfig(method="lora", lora_init="eva", eva_rho=1.5, lora_rank=2)
    with pytest.raises(ValidationError, match="lora_rank"):
        FinetuneConfig(method="full", lora_rank=8)
    with pytest.raises(ValidationError, match="eva_batches"):
        FinetuneConfig(method="lora", eva_batches=2)
    with pytest.raises(ValidationError):
        FinetuneConfig(method="lora", lora_init="eva", eva_rho=0.5)
    dumped = FinetuneConfig(method="head").model_dump(mode="json")
    assert FinetuneConfig.model_validate(dumped).method == "head"


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    base = _kaiming(build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10), torch.Generator().manual_seed(0))
    fit(base, x[train], y[train], FitConfig(epochs=6, batch_size=64), torch.Generator().manual_seed(0),
        label="digits base")
    return base, x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def head_only_accuracy(digits):
    base, x, y, xt, yt = digits
    cfg = FinetuneConfig(method="head", epochs=4, batch_size=64, lr=3e-3)
    return accuracy(finetune(base, hflip(x), y, cfg, torch.Generator().manual_seed(0)), hflip(xt), yt)


@pytest.mark.parametrize("init", ["random", "eva"])
def test_lora_on_digits_hflip_beats_the_base_and_head_only(digits, head_only_accuracy, init):
    base, x, y, xt, yt = digits
    cfg = FinetuneConfig(method="lora", lora_init=init, epochs=4, batch_size=64, lr=3e-3)
    model, history = finetune_with_history(base, hflip(x), y, cfg, torch.Generator().manual_seed(0))
    before, after = accuracy(base, hflip(xt), yt), accuracy(model, hflip(xt), yt)
    assert len(history) == 4 and history[-1] < history[0]
    assert after > before + 0.2, (before, after)
    assert after > head_only_accuracy + 0.05, (head_only_accuracy, after)  # the adapters matter


def test_resolved_config_shows_lora_fields_only_where_they_apply():
    assert not any(k.startswith(("lora_", "eva_")) for k in FinetuneConfig().model_dump())
    random = FinetuneConfig(method="lora").model_dump(mode="json")
    assert "lora_rank" in random and "eva_rho" not in random
    eva = FinetuneConfig(method="lora", lora_init="eva", eva_rho=3.0)
    assert FinetuneConfig.model_validate(eva.model_dump(mode="json")) == eva
