"""OFQ's query–key reparameterization (QKR) in QAT: tasks/quantize/qat.py, qat_quantizers.QkrAttention."""

import copy

import pydantic
import pytest
import torch

from slimforge.models import SlimAttention, ViTConfig, build_model
from slimforge.training import FitConfig
from tasks.quantize.packed import load_quantized, pack_layers, packed_layout
from tasks.quantize.qat import QatConfig, prepare_qkr, quantize_qat
from tasks.quantize.qat_quantizers import QkrAttention, confident


def cfg(**kw) -> QatConfig:
    return QatConfig(name="t", bits=kw.pop("bits", 2), quantizer=kw.pop("quantizer", "ofq"), **kw)


def vit(seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny ViT (block 1 head-pruned: SlimAttention) with every parameter, biases included, random."""
    model = build_model(ViTConfig(width=16, depth=2, heads=2, mlp=32, **kw), (1, 28, 28), 10)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model.eval()


def attention(seed: int = 1, slim: bool = False) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    attn = SlimAttention(16, 2, 4) if slim else torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.3))
    return attn


@pytest.mark.parametrize("slim", [False, True])
def test_reparameterized_attention_in_float_is_the_original(slim):
    attn = attention(slim=slim)
    qkr = QkrAttention(attn, cfg())
    qkr.quantizer = torch.nn.Identity()  # float Ŵ_qk = W_qᵀW_k
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = attn(x, x, x, need_weights=False)[0], qkr(x, x, x)[0]
    assert (ref - got).abs().max() < 1e-5, f"max diff {(ref - got).abs().max():.2e}"  # q/k biases included
    exported = copy.deepcopy(attn)
    with torch.no_grad():
        exported.in_proj_weight.copy_(qkr.export_in_proj()[0])
        exported.in_proj_bias.copy_(qkr.export_in_proj()[1])
        back = exported(x, x, x, need_weights=False)[0]
    assert (ref - back).abs().max() < 1e-5, f"max diff {(ref - back).abs().max():.2e}"  # refactored, same function


def truncated(w: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """Each head's (C, C) block of ``w`` (H·C, C) truncated to its top ``rank`` singular values."""
    u, s, vt = torch.linalg.svd(w.double().unflatten(0, (heads, -1)))
    return (u[..., :rank] * s[:, None, :rank] @ vt[:, :rank]).flatten(0, 1).float()


@pytest.mark.parametrize("slim", [False, True])
def test_the_export_holds_the_nearest_rank_hd_product_to_the_quantized_one(slim):
    attn = attention(slim=slim)
    with torch.no_grad():
        attn.in_proj_bias[: attn.in_proj_bias.shape[0] // 3].zero_()  # b_q = 0: the logits are x Ŵ_qk xᵀ alone
    qkr = QkrAttention(attn, cfg(bits=2))
    heads, hd = qkr.heads, qkr.head_dim
    weight, bias = qkr.export_in_proj()
    inner = heads * hd
    wq, wk = weight[: 2 * inner].unflatten(0, (2, heads, hd)).unbind(0)
    product = (wq.transpose(1, 2) @ wk).flatten(0, 1)  # what the exported float attention multiplies
    w_hat = qkr.quantized_product(qkr.product()).detach()
    assert torch.allclose(product, truncated(w_hat, heads, hd), atol=1e-5)
    assert (product - w_hat).norm() <= (qkr.product().detach() - w_hat).norm()  # Eckart–Young: nearer than W_qᵀW_k
    assert torch.equal(weight[2 * inner:], attn.in_proj_weight.detach()[2 * inner:])  # W_v the base's
    assert torch.equal(bias[inner:], attn.in_proj_bias.detach()[inner:]) and not bias[:inner].any()
    exported = copy.deepcopy(attn)
    with torch.no_grad():
        exported.in_proj_weight.copy_(weight)
        exported.in_proj_bias.copy_(bias)
    quantize = qkr.quantized_product
    qkr.quantized_product = lambda w: truncated(quantize(w), heads, hd)  # the forward on the truncated Ŵ_qk
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        diff = (exported(x, x, x, need_weights=False)[0] - qkr(x, x, x)[0]).abs().max()
    assert diff < 1e-5, f"max diff {diff:.2e}"


def test_the_whole_vit_in_float_is_unchanged_by_qkr():
    model = vit(block_heads=[2, 1])
    work = copy.deepcopy(model)
    swapped = prepare_qkr(work, cfg())
    assert sorted(swapped) == ["backbone.blocks.0.attn", "backbone.blocks.1.attn"]
    for a in swapped.values():
        a.quantizer = torch.nn.Identity()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - work(x)).abs().max() < 1e-5


def test_logits_come_from_the_quantized_per_head_product():
    attn = attention()
    qkr = QkrAttention(attn, cfg(bits=2, granularity="channel"))
    wq, wk, _ = attn.in_proj_weight.detach().unflatten(0, (3, 4, 4)).unbind(0)  # (H, hd, C) each
    product = (wq.transpose(1, 2) @ wk).flatten(0, 1)  # (H·C, C)
    assert torch.allclose(qkr.product().detach(), product, atol=1e-6)
    w_hat = qkr.quantized_product(qkr.product()).detach()
    s = (2 * product.abs().mean(1, keepdim=True) / 2).half().float()  # StatsQ per row of the product
    assert torch.allclose(w_hat, torch.clamp(torch.round(product / s), -2, 1) * s, atol=1e-6)
    assert all(len(row.unique()) <= 4 for row in w_hat)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    b_q, _, b_v = attn.in_proj_bias.detach().chunk(3)
    u = torch.einsum("hdc,hd->hc", wk, b_q.reshape(4, 4))
    logits = torch.einsum("bnc,hcd,bmd->bhnm", x, w_hat.reshape(4, 16, 16), x) + torch.einsum("hc,bmc->bhm", u, x)[:, :, None]
    v = (x @ attn.in_proj_weight.detach()[32:].T + b_v).reshape(2, 6, 4, 4).transpose(1, 2)
    expected = attn.out_proj((torch.softmax(logits / 2, -1) @ v).transpose(1, 2).flatten(2))
    with torch.no_grad():
        assert (qkr(x, x, x)[0] - expected).abs().max() < 1e-5


def test_gradient_reaches_wq_and_wk_through_the_product_only():
    attn = attention()
    with torch.no_grad():
        attn.in_proj_bias[:16].zero_()  # b_q = 0: the logits depend on W_q, W_k only through W_qᵀW_k
    qkr = QkrAttention(attn, cfg(bits=2))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    seen, quantize = {}, qkr.quantized_product

    def capture(w):
        w.register_hook(lambda g: seen.setdefault("G", g))
        return quantize(w)

    qkr.quantized_product = capture
    qkr(x, x, x)[0].square().sum().backward()
    g = seen["G"].reshape(4, 16, 16)  # ∂L/∂W_qk per head; StatsQ passes ∂L/∂Ŵ_qk to it unchanged
    wq, wk = qkr.query_key.detach().unflatten(0, (2, 4, 4)).unbind(0)
    grad_q, grad_k = qkr.query_key.grad.unflatten(0, (2, 4, 4)).unbind(0)
    assert g.abs().sum() > 0
    assert torch.allclose(grad_q, wk @ g.transpose(1, 2), atol=1e-5)  # ∂L/∂W_q^h = W_k^h G_hᵀ
    assert torch.allclose(grad_k, wq @ g, atol=1e-5)  # ∂L/∂W_k^h = W_q^h G_h
    assert attn.in_proj_weight.grad is None and not qkr.value_weight.requires_grad  # W_v stays the base's
    assert attn.out_proj.weight.grad.abs().sum() > 0


def test_cga_stops_the_gradient_of_confident_product_entries():
    qkr = QkrAttention(attention(), cfg(bits=2))
    qkr.boundary_range = 0.1
    w = qkr.product().detach().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    (qkr.quantized_product(w) * upstream).sum().backward()
    frozen = confident(qkr.quantizer, w, 0.1)
    assert 0 < frozen.float().mean() < 1
    assert torch.equal(w.grad, torch.where(frozen, 0.0, upstream))


def test_an_attention_qkr_cannot_reproduce_is_refused():
    with pytest.raises(ValueError, match="batch_first=True"):
        QkrAttention(torch.nn.MultiheadAttention(16, 4), cfg())
    with pytest.raises(ValueError, match="dropout 0"):
        QkrAttention(torch.nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True), cfg())


def test_qkr_belongs_to_ofq():
    assert cfg().qkr and not cfg(qkr=False).qkr
    lsq = cfg(quantizer="lsq")
    assert not lsq.qkr and QatConfig.model_validate(lsq.model_dump()) == lsq  # ofq's default, recorded as false
    with pytest.raises(pydantic.ValidationError, match="qkr: true needs quantizer: ofq"):
        cfg(quantizer="lsq", qkr=True)


def test_ofq_with_qkr_trains_a_vit_and_exports_its_in_projections():
    model = vit(block_heads=[2, 1])
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(96, 1, 28, 28, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    config = cfg(bits=2, training=FitConfig(epochs=2, batch_size=32, lr=3e-3, weight_decay=0), cga_epochs=1)
    layers = quantize_qat(model, (x, y), config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base untouched
    assert [row["phase"] for row in layers.report] == ["qat", "qat", "cga"]
    assert all(0 <= row["qk_oscillating_share"] <= 1 for row in layers.report)
    assert sorted(layers.tensors) == [f"backbone.blocks.{i}.attn.in_proj_{t}" for i in (0, 1) for t in ("bias", "weight")]
    for key, w in layers.tensors.items():
        base = before[key]
        inner = base.shape[0] // 3
        assert w.shape == base.shape and not torch.equal(w[:inner], base[:inner])  # W_q, b_q from Ŵ_qk
        assert torch.equal(w[2 * inner:], base[2 * inner:])  # W_v, b_v the base's
    tensors = {**pack_layers(model, layers), **layers.tensors}
    loaded = load_quantized(vit(seed=9, block_heads=[2, 1]), tensors, packed_layout(config, tensors), "torch")
    for key, w in layers.tensors.items():
        assert torch.equal(loaded.state_dict()[key], w)
    assert loaded(x).isfinite().all()
    no_qkr = quantize_qat(model, (x, y), config.model_copy(update={"qkr": False}))
    assert not no_qkr.tensors and "qk_oscillating_share" not in no_qkr.report[0]
