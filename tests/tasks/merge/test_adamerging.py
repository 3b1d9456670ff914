import copy

import pytest
import torch

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, fit
from slimforge.transforms import apply_transform
from tasks.merge.adamerging import (
    AdaMergingConfig,
    adamerging,
    float_names,
    merged_backbone,
    merging_loss,
)
from tasks.train.init import initialize

TRANSFORMS = ("rotate90", "hflip", "invert")


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def tasks(digits_split, one_thread):
    """A base MLP on 8x8 digits and three fine-tunes of it, one per transformed task.

    Returns (model, base backbone, task vectors, heads, held-out inputs, held-out labels)."""
    xtr, ytr, xte, yte = digits_split
    xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)  # (N, 1, 8, 8)
    base = build_model(MLPConfig(hidden=[32]), (1, 8, 8), 10)
    initialize(base, "kaiming", torch.Generator().manual_seed(0))
    fit(base, xtr, ytr, FitConfig(epochs=3, batch_size=64, lr=1e-2), torch.Generator().manual_seed(0))
    theta0 = _clone(base.backbone.state_dict())
    taus, heads = [], []
    for k, name in enumerate(TRANSFORMS):
        model = copy.deepcopy(base)
        fit(model, apply_transform(name, xtr), ytr, FitConfig(epochs=8, batch_size=64, lr=1e-2),
            torch.Generator().manual_seed(k + 1))
        taus.append({n: w.detach() - theta0[n] for n, w in model.backbone.state_dict().items()})
        heads.append(_clone(model.head.state_dict()))
    inputs = [apply_transform(name, xte) for name in TRANSFORMS]
    return base, theta0, taus, heads, inputs, [yte] * len(TRANSFORMS)


def _double(tasks):
    model, base, taus, heads, inputs, labels = tasks
    d = lambda s: {k: v.double() for k, v in s.items()}
    return (copy.deepcopy(model).double(), d(base), [d(t) for t in taus], [d(h) for h in heads],
            [x.double() for x in inputs], labels)


def _full_loss(tasks, coefficients, labels=None):
    model, base, taus, heads, inputs, _ = tasks
    with torch.no_grad():
        return merging_loss(model, merged_backbone(base, taus, coefficients), heads, inputs, labels).item()


def test_config_defaults_are_the_papers():
    cfg = AdaMergingConfig()
    assert (cfg.granularity, cfg.lambda_init, cfg.lr, cfg.steps, cfg.batch_size) == ("layer", 0.3, 1e-3, 500, 16)
    with pytest.raises(ValueError):
        AdaMergingConfig(steps=-1)
    with pytest.raises(ValueError):
        AdaMergingConfig(lambda_init=1.5)  # the reference clamps λ to [0, 1]
    with pytest.raises(ValueError):
        AdaMergingConfig(prior=0.3)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_the_lambda_gradient_matches_central_differences(tasks, granularity):
    model, base, taus, heads, inputs, labels = _double(tasks)
    batches = [x[:16] for x in inputs]
    shape = (3,) if granularity == "task" else (3, len(float_names(base)))
    lam = 0.1 + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    def f(c, y):
        return merging_loss(model, merged_backbone(base, taus, c), heads, batches, y)

    for y in (None, [y[:16] for y in labels]):  # entropy, then cross-entropy
        lam_ = lam.clone().requires_grad_()
        (grad,) = torch.autograd.grad(f(lam_, y), lam_)
        numeric = torch.zeros_like(lam)
        eps = 1e-6
        with torch.no_grad():
            for i in range(lam.numel()):
                step = torch.zeros_like(lam).view(-1)
                step[i] = eps
                step = step.view_as(lam)
                numeric.view(-1)[i] = (f(lam + step, y) - f(lam - step, y)) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_adamerging_lowers_the_entropy_and_leaves_its_inputs_alone(tasks):
    model, base, taus, heads, inputs, _ = tasks
    before = [_clone(base), [_clone(t) for t in taus], [_clone(h) for h in heads], _clone(model.state_dict())]
    out = adamerging(model, base, taus, heads, inputs, AdaMergingConfig(), torch.Generator().manual_seed(0))
    assert out.coefficients.shape == (3, len(float_names(base))) and len(out.entropy_history) == 500
    assert ((out.coefficients >= 0) & (out.coefficients <= 1)).all()
    start = _full_loss(tasks, torch.full((3,), 0.3))
    end = _full_loss(tasks, out.coefficients)
    assert end <= start, f"mean entropy on all inputs rose from {start:.4f} to {end:.4f}"
    assert not torch.equal(out.coefficients, torch.full_like(out.coefficients, 0.3))
    for name, w in merged_backbone(base, taus, out.coefficients).items():
        assert torch.equal(out.backbone[name], w) and not out.backbone[name].requires_grad
    after = [base, taus, heads, model.state_dict()]
    for b, a in zip(before, after):
        for sb, sa in zip(b if isinstance(b, list) else [b], a if isinstance(a, list) else [a]):
            assert all(torch.equal(sb[k], sa[k]) for k in sb)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_frozen_coefficients_are_task_arithmetic(tasks, granularity):
    model, base, taus, heads, inputs, _ = tasks
    for cfg in (AdaMergingConfig(granularity=granularity, steps=0),
                AdaMergingConfig(granularity=granularity, steps=3, lr=0.0)):
        one = adamerging(model, base, taus[:1], heads[:1], inputs[:1], cfg, torch.Generator())
        for name, w0 in base.items():  # task arithmetic at λ = 0.3, one task: bit for bit
            assert torch.equal(one.backbone[name], w0 + 0.3 * sum(tau[name] for tau in taus[:1])), name
        out = adamerging(model, base, taus, heads, inputs, cfg, torch.Generator())
        assert (out.coefficients == torch.tensor(0.3)).all()
        for name, w0 in base.items():  # three tasks: λΣτ vs Σλτ differ by rounding only
            expected = w0 + 0.3 * sum(tau[name] for tau in taus)
            torch.testing.assert_close(out.backbone[name], expected, rtol=0, atol=1e-6)
            assert torch.equal(out.backbone[name], w0 + sum(0.3 * tau[name] for tau in taus))


def test_frozen_coefficients_are_task_arithmetic_bit_for_bit_where_arithmetic_is_exact(tasks):
    model, base, taus, heads, inputs, _ = tasks
    dyadic = lambda s: {k: torch.round(v * 64) / 64 for k, v in s.items()}
    base, taus = dyadic(base), [dyadic(t) for t in taus]
    out = adamerging(model, base, taus, heads, inputs, AdaMergingConfig(steps=0, lambda_init=0.5), torch.Generator())
    for name, w0 in base.items():
        assert torch.equal(out.backbone[name], w0 + 0.5 * sum(tau[name] for tau in taus)), name


def test_the_same_seed_gives_the_same_coefficients(tasks):
    model, base, taus, heads, inputs, _ = tasks
    cfg = AdaMergingConfig(granularity="task", steps=20, lr=1e-2)
    runs = [adamerging(model, base, taus, heads, inputs, cfg, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0].coefficients, runs[1].coefficients)
    assert runs[0].entropy_history == runs[1].entropy_history
    assert not torch.equal(runs[0].coefficients, runs[2].coefficients)


def test_the_labeled_variant_lowers_the_cross_entropy(tasks):
    model, base, taus, heads, inputs, labels = tasks
    cfg = AdaMergingConfig(granularity="task", objective="cross_entropy", steps=100, lr=1e-2)
    out = adamerging(model, base, taus, heads, inputs, cfg, torch.Generator().manual_seed(0), labels=labels)
    assert _full_loss(tasks, out.coefficients, labels) < _full_loss(tasks, torch.full((3,), 0.3), labels)


def test_mismatched_tasks_are_refused_with_a_clear_message(tasks):
    model, base, taus, heads, inputs, labels = tasks
    cfg, g = AdaMergingConfig(steps=1), torch.Generator()
    with pytest.raises(ValueError, match="3 task vectors but 2 input tensors"):
        adamerging(model, base, taus, heads, inputs[:2], cfg, g)
    with pytest.raises(ValueError, match="3 task vectors but 4 heads"):
        adamerging(model, base, taus, heads + heads[:1], inputs, cfg, g)
    with pytest.raises(ValueError, match="no task vectors"):
        adamerging(model, base, [], [], [], cfg, g)
    with pytest.raises(ValueError, match="task 1's inputs have shape"):
        adamerging(model, base, taus, heads, [inputs[0], inputs[1][:, :, :4], inputs[2]], cfg, g)
    with pytest.raises(ValueError, match="task 2's inputs have shape"):
        adamerging(model, base, taus, heads, [inputs[0], inputs[1], inputs[2][:0]], cfg, g)
    with pytest.raises(ValueError, match="needs labels"):
        adamerging(model, base, taus, heads, inputs, cfg.model_copy(update={"objective": "cross_entropy"}), g)
    with pytest.raises(ValueError, match="task 0 has 597 inputs but 10 labels"):
        adamerging(model, base, taus, heads, inputs, cfg, g, labels=[labels[0][:10], *labels[1:]])
    bad = [taus[0], {**taus[1], "1.weight": taus[1]["1.weight"][:, :5]}, taus[2]]
    with pytest.raises(ValueError, match="task vector 1 has shape \\(32, 5\\) for backbone tensor '1.weight'"):
        adamerging(model, base, bad, heads, inputs, cfg, g)
    with pytest.raises(ValueError, match=r"coefficients of shape \(3, 7\)"):
        merged_backbone(base, taus, torch.zeros(3, 7))
