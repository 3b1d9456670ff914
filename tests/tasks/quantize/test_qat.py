"""QAT (tasks/quantize/qat.py, qat_quantizers.py): METHODS.md §5 `ste`, `lsq`, `ofq` properties."""

import copy

import pydantic
import pytest
import torch

from slimforge.models import ViTConfig, build_model
from slimforge.training import FitConfig, accuracy
from tasks.quantize import QuantizeMethod, get_method
from tasks.quantize.layerwise import quantizable, quantize_rtn
from tasks.quantize.qat import Annealing, QatConfig, convert, latent_weights, prepare, quantize_qat
from tasks.quantize.qat_quantizers import (
    LsqQuantizer,
    OscillationTracker,
    StatsQuantizer,
    SteQuantizer,
    confident,
)
from tasks.quantize.rtn import RtnConfig


def cfg(**kw) -> QatConfig:
    return QatConfig(name="t", bits=kw.pop("bits", 3), **kw)


def test_lsq_init_and_step_gradient_follow_the_paper():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(4, 16, generator=gen) * 0.6).requires_grad_(True)
    q = LsqQuantizer(w, cfg(bits=3, granularity="channel"))  # Q_N = 4, Q_P = 3
    assert torch.allclose(q.step_size.detach()[:, 0, 0], 2 * w.detach().abs().mean(1) / 3**0.5)
    with torch.no_grad():
        q.step_size.copy_(torch.tensor([0.25, 0.125, 0.5, 0.0625]).reshape(4, 1, 1))  # float16-exact steps
    upstream = torch.randn(4, 16, generator=gen)
    (q(w) * upstream).sum().backward()
    s = q.step_size.detach()[:, 0]  # (4, 1)
    v = w.detach() / s
    inside = (v >= -4) & (v <= 3)
    assert inside.any() and (~inside).any(), "the case must exercise both sides of the clip"
    d_s = torch.where(v < -4, -4.0, torch.where(v > 3, 3.0, torch.round(v) - v))  # ∂w_hat/∂s, LSQ eq. 3
    g = 1 / (16 * 3) ** 0.5  # 1/√(N_w·Q_P), N_w = 16 weights per step
    expected = g * (d_s * upstream).sum(1)
    assert torch.allclose(q.step_size.grad[:, 0, 0], expected, atol=1e-6), (q.step_size.grad.flatten(), expected)
    assert torch.equal(w.grad, torch.where(inside, upstream, 0.0))  # STE inside the range, 0 outside


def test_ste_gradient_is_exact_inside_the_range_and_zero_outside():
    w = torch.tensor([[-3.0, -1.3, -0.2, 0.0, 0.4, 0.9, 1.2, 5.0]], requires_grad=True)
    q = SteQuantizer(w, cfg(bits=2, granularity="channel"))  # codes -2..1
    out = q.quantize(q.grouped(w), torch.tensor(1.0)).reshape(1, -1)
    assert out.tolist() == [[-2.0, -1.0, -0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]  # clipped outside [-2, 1]
    w_hat = q(w.detach())  # its own step, max|w| / Q_P, clips nothing
    assert torch.allclose(w_hat.abs().max(), w.detach().abs().max(), rtol=1e-3)


def test_statsq_levels_step_and_gradient():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 32, generator=gen).requires_grad_(True)
    q = StatsQuantizer(w, cfg(bits=2, granularity="channel"))
    w_hat = q(w)
    s = (2 * w.detach().abs().mean(1, keepdim=True) / 2).half().float()  # α = 2·mean|w|, step α / 2^(b-1)
    assert torch.allclose(w_hat.detach(), torch.clamp(torch.round(w.detach() / s), -2, 1) * s)
    assert all(len(row.unique()) <= 4 for row in w_hat.detach())
    upstream = torch.randn(6, 32, generator=gen)
    (w_hat * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # identity STE, the statistical step takes no gradient
    assert not list(q.parameters())


def test_confident_weights_are_far_from_every_rounding_threshold():
    # mean|w| = 1, so StatsQ's 2-bit step is 1 and w/s = w; thresholds at -1.5, -0.5, 0.5
    w = torch.tensor([[1.0, -1.0, 0.502, 1.498, -0.497, -0.999, 1.0, -1.504]])
    assert torch.isclose(w.abs().mean(), torch.tensor(1.0))
    q = StatsQuantizer(w, cfg(bits=2, granularity="channel"))
    assert confident(q, w, 0.005).tolist() == [[True, True, False, True, False, True, True, False]]


def test_cga_freezes_confident_weights_for_a_step():
    gen = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    config = cfg(bits=2, quantizer="ofq", boundary_range=0.1)
    quantizers = prepare(model, config)
    latent = latent_weights(model, quantizers)
    annealing = Annealing(quantizers, latent, config.boundary_range)
    before = {n: p.detach().clone() for n, p in latent.items()}
    frozen = {n: m.clone() for n, m in annealing.frozen.items()}
    codes = {n: q.codes(latent[n]) for n, q in quantizers.items()}
    opt = torch.optim.AdamW(latent.values(), lr=1e-3, weight_decay=0.1)
    x = torch.randn(64, 32, generator=gen)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (64,), generator=gen)).backward()
    assert all((p.grad[frozen[n]] == 0).all() for n, p in latent.items())
    opt.step()
    annealing.after_step()
    for n, p in latent.items():
        assert 0 < frozen[n].float().mean() < 1
        assert torch.equal(p.detach()[frozen[n]], before[n][frozen[n]])  # frozen: bit-identical
        assert (p.detach()[~frozen[n]] != before[n][~frozen[n]]).any()  # the rest train
        same = quantizers[n].codes(p).reshape(p.shape)[frozen[n]] == codes[n].reshape(p.shape)[frozen[n]]
        assert same.all(), f"{n}: {int((~same).sum())} frozen codes changed"
    annealing.remove()


def test_oscillation_tracker_counts_a_constructed_sequence():
    steps = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 2, -1], [1, 3, -1], [1, 3, 0], [2, 3, 0]], dtype=torch.float32)
    tracker = OscillationTracker(steps[0], momentum=0.5)
    flags = [tracker.update(codes).tolist() for codes in steps[1:]]
    # weight 0: +1, -1 (osc), +1 (osc), 0, +1; weight 1 monotone; weight 2: -1, 0, +1 (osc), 0
    assert flags == [[False, False, False], [True, False, False], [True, False, False],
                     [False, False, True], [False, False, False]]
    assert tracker.count.tolist() == [2, 0, 1]
    assert tracker.frequency.tolist() == [0.1875, 0.0, 0.25]  # EMA 0.5·o + 0.5·f
    assert tracker.close_window() == (2, 3)
    assert tracker.close_window() == (0, 3)


@pytest.mark.parametrize("quantizer,granularity", [("ste", "channel"), ("lsq", "group"), ("ofq", "tensor")])
def test_exported_layers_reproduce_the_fake_quant_forward(trained_cnn, digits_split, quantizer, granularity, dense_twin):
    x = digits_split[2][:200]
    work = copy.deepcopy(trained_cnn)
    config = cfg(bits=4, quantizer=quantizer, granularity=granularity, group_size=16)
    quantizers = prepare(work, config)
    with torch.no_grad():  # move off the initial grid, as training would
        for p in latent_weights(work, quantizers).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * p.std() * 0.3)
        for q in quantizers.values():
            for s in q.parameters():
                s.mul_(1.37)
        fake = work(x)
    layers = convert(work, quantizers)
    assert len(layers) == len(quantizable(trained_cnn, config)) >= 2  # layers whose K fits the grid
    for layer in layers.values():
        qw = layer.weight
        assert qw.zeros is None and torch.equal(qw.scales, qw.scales.half().float())  # stored exactly as float16
        assert qw.codes.min() >= -8 and qw.codes.max() <= 7
    with torch.no_grad():
        exported = dense_twin(trained_cnn, layers)(x)
    assert (fake - exported).abs().max() <= 1e-5, f"max diff {(fake - exported).abs().max():.2e}"


def test_vit_attention_output_projection_trains_through_the_parametrization():
    model = build_model(ViTConfig(width=16, depth=1, heads=2, mlp=32), (1, 28, 28), 10)
    quantizers = prepare(model, cfg(bits=4, quantizer="lsq"))
    name = next(n for n in quantizers if n.endswith("attn.out_proj"))  # read by .weight inside the fused attention
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert latent_weights(model, quantizers)[name].grad.abs().sum() > 0
    assert quantizers[name].step_size.grad.abs().sum() > 0


@pytest.mark.parametrize("quantizer", ["ste", "lsq", "ofq"])
def test_qat_at_4_bits_does_not_lose_to_rtn(trained_mlp, digits_split, quantizer, dense_twin):
    xtr, ytr, xte, yte = digits_split
    rtn = accuracy(dense_twin(trained_mlp, quantize_rtn(trained_mlp, None, RtnConfig(name="r", bits=4))), xte, yte)
    config = cfg(bits=4, quantizer=quantizer, training=FitConfig(epochs=3, lr=1e-3, batch_size=64, weight_decay=0))
    layers = quantize_qat(trained_mlp, (xtr, ytr), config)
    qat = accuracy(dense_twin(trained_mlp, layers), xte, yte)
    assert qat >= rtn, f"{quantizer}: QAT {qat:.4f} vs RTN {rtn:.4f}"
    phases = [row["phase"] for row in layers.report]
    assert phases == ["qat"] * 3 + (["cga"] * 2 if quantizer == "ofq" else [])
    assert all(0 <= row["oscillating_share"] <= 1 and row["loss"] > 0 for row in layers.report)
    if quantizer == "ofq":
        assert layers.report[-1]["frozen_share"] > 0.9  # a 0.005-step band leaves ~1% of weights training


def test_qat_needs_the_labelled_train_split(trained_mlp, digits_split):
    assert get_method("qat").data == "train" and get_method("rtn").data == "calibration"
    with pytest.raises(ValueError, match="labelled train split"):
        quantize_qat(trained_mlp, digits_split[0], cfg())


def test_config_errors_name_the_key_and_valid_values():
    adapter = pydantic.TypeAdapter(QuantizeMethod)
    assert isinstance(adapter.validate_python({"name": "q", "method": "qat", "bits": 2, "quantizer": "ofq"}), QatConfig)
    with pytest.raises(pydantic.ValidationError, match="'ste', 'lsq' or 'ofq'"):
        adapter.validate_python({"name": "q", "method": "qat", "bits": 2, "quantizer": "pact"})
    with pytest.raises(pydantic.ValidationError, match="symmetric: true"):
        adapter.validate_python({"name": "q", "method": "qat", "bits": 2, "symmetric": False})
