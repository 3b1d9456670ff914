import pytest
import torch
from sklearn.datasets import load_digits

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.select.dsa import derive_generator
from tasks.select.gradient_matching import (
    GradientMatchingConfig,
    class_members,
    gradient_distance,
    loss_gradients,
    matching_loss,
    select_gradient_matching,
)
from tasks.select.selection import SelectContext
from tasks.train.init import initialize

CNN = CNNConfig(channels=[8, 16], hidden=32)


def _digits(images=True, per_class=60):
    """sklearn's 8x8 digits in [0, 1], ``per_class`` of each class, as (N, 1, 8, 8) or (N, 64)."""
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    x, y = x[keep], y[keep]
    return (x.reshape(-1, 1, 8, 8) if images else x), y


def _factory(arch, shape):
    def make(g):
        model = build_model(arch, shape, 10)
        initialize(model, "kaiming", g)
        return model

    return make


def _context(x, y, arch=CNN, seed=0):
    return SelectContext(x=x, y=y, num_classes=10, make_model=_factory(arch, tuple(x.shape[1:])), epochs=1,
                         generator=torch.Generator().manual_seed(seed))


def test_distance_is_zero_for_identical_gradients_and_ignores_positive_row_scales():
    x, y = _digits()
    model = _factory(CNN, (1, 8, 8))(torch.Generator().manual_seed(0))
    a = loss_gradients(model, x[:40], y[:40])
    b = loss_gradients(model, x[40:120], y[40:120])
    tol = 1e-2  # the reference's 1e-6 in the cosine's denominator, against rows of norm ~1e-3
    assert gradient_distance(a, a).abs() < tol
    g = torch.Generator().manual_seed(1)
    scaled = [t * (torch.rand(len(t), *[1] * (t.dim() - 1), generator=g) * 10 + 0.1) for t in a]
    assert gradient_distance(scaled, a).abs() < tol
    assert torch.allclose(gradient_distance(scaled, b), gradient_distance(a, b), atol=tol)
    assert gradient_distance(a, b) > 1.0
    # flipping one row's sign costs 2 for that row (cos 1 -> -1)
    flipped = [t.clone() for t in a]
    flipped[0][0] *= -1
    assert torch.allclose(gradient_distance(flipped, a), torch.tensor(2.0), atol=tol)


def test_synthetic_images_get_a_nonzero_gradient_for_every_class():
    x, y = _digits()
    cfg = GradientMatchingConfig(ipc=2, real_batch=16, outer_loop=1, inner_loop=1)
    syn = x[torch.cat([torch.nonzero(y == c).flatten()[-2:] for c in range(10)])].clone().requires_grad_(True)
    model = _factory(CNN, (1, 8, 8))(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    loss = matching_loss(model, x, class_members(y, 10), syn, cfg, g, derive_generator(g))
    (grad,) = torch.autograd.grad(loss, syn)
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def _held_out_distance(syn, x, y, cfg, nets=6):
    """Mean matching loss of S on fixed real batches and fixed networks, no augmentation."""
    g = torch.Generator().manual_seed(123)
    held = cfg.model_copy(update={"dsa": False})
    make = _factory(CNN, (1, 8, 8))
    return sum(matching_loss(make(g), x, class_members(y, 10), syn, held, g, g).item() for _ in range(nets)) / nets


def test_held_out_distance_drops_within_a_few_dozen_iterations():
    x, y = _digits(per_class=80)
    train, held = torch.arange(len(y)) % 2 == 0, torch.arange(len(y)) % 2 == 1
    cfg = GradientMatchingConfig(ipc=1, iterations=40, real_batch=40, lr_img=0.05)
    out = select_gradient_matching(_context(x[train], y[train]), cfg)
    g = torch.Generator().manual_seed(9)  # S starts as random real images: so is the baseline
    real_sets = [x[train][torch.cat([m[torch.randperm(len(m), generator=g)[:1]] for m in class_members(y[train], 10)])]
                 for _ in range(3)]
    before = sum(_held_out_distance(s, x[held], y[held], cfg) for s in real_sets) / 3
    after = _held_out_distance(out.images, x[held], y[held], cfg)
    assert after < before - 1.0, f"held-out distance {before:.2f} -> {after:.2f}"


def test_same_seed_is_bit_identical_and_another_seed_differs():
    x, y = _digits(per_class=20)
    cfg = GradientMatchingConfig(ipc=2, iterations=2, outer_loop=2, inner_loop=2, real_batch=8)
    a = select_gradient_matching(_context(x, y, seed=3), cfg)
    b = select_gradient_matching(_context(x, y, seed=3), cfg)
    c = select_gradient_matching(_context(x, y, seed=4), cfg)
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 1, 8, 8) and a.labels.tolist() == sorted(a.labels.tolist())
    assert len(a.history) == 2


def test_vectors_are_distilled_without_augmentation():
    x, y = _digits(images=False, per_class=20)
    cfg = GradientMatchingConfig(ipc=1, iterations=3, real_batch=8)
    out = select_gradient_matching(_context(x, y, arch=MLPConfig(hidden=[32])), cfg)
    assert out.images.shape == (10, 64) and all(torch.isfinite(torch.tensor(out.history)))


def test_loops_default_to_the_paper_and_unknown_ipc_must_set_them():
    assert GradientMatchingConfig(ipc=1).loops() == (1, 1)
    assert GradientMatchingConfig(ipc=10).loops() == (10, 50)
    assert GradientMatchingConfig(ipc=50).loops() == (50, 10)
    assert GradientMatchingConfig(ipc=10, inner_loop=0).loops() == (10, 0)
    with pytest.raises(ValueError, match="ipc 7"):
        GradientMatchingConfig(ipc=7)
    assert GradientMatchingConfig(ipc=7, outer_loop=3, inner_loop=4).loops() == (3, 4)
