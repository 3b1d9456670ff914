import torch
from sklearn.datasets import load_digits
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.select.distribution_matching import (
    DistributionMatchingConfig,
    distill_distribution,
    matching_loss,
    mean_embedding_distance,
    select_distribution_matching,
)
from tasks.select.dsa import derive_generator
from tasks.select.gradient_matching import class_members
from tasks.select.selection import SelectContext
from tasks.train.init import initialize

CNN = CNNConfig(channels=[8, 16], hidden=32)


def _digits(images=True, per_class=30):
    """sklearn's 8x8 digits in [0, 1], ``per_class`` of each class grouped by class."""
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    x, y = x[keep], y[keep]
    return (x.reshape(-1, 1, 8, 8) if images else x), y


def _backbone(arch, shape, g):
    model = build_model(arch, shape, 10)
    initialize(model, "kaiming", g)
    return model.backbone


def test_identity_embedding_reaches_the_class_mean():
    x, y = _digits()
    cfg = DistributionMatchingConfig(ipc=1, iterations=150, lr_img=0.25, real_batch=1000, dsa=False)
    out = distill_distribution(x, y, 10, lambda g: nn.Identity(), cfg, torch.Generator().manual_seed(0))
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    err = (out.images - means).abs().max().item()
    assert err < 1e-3, f"max distance to the class mean {err:.2e}"
    assert out.history[-1] < 1e-6 < out.history[0]


def test_loss_is_zero_when_s_is_the_real_batch_under_shared_augmentation():
    x, y = _digits(per_class=12)
    embed = _backbone(CNN, (1, 8, 8), torch.Generator().manual_seed(0))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert mean_embedding_distance(embed, x[y == 3], x[y == 3].flip(0)) < 1e-10
    # S is every real example of each class in another order; the real batch is all of the class
    syn = torch.cat([x[y == c].flip(0) for c in range(10)])
    cfg = DistributionMatchingConfig(ipc=12, real_batch=12)
    g = torch.Generator().manual_seed(2)
    same = matching_loss(embed, x, class_members(y, 10), syn, cfg, g, derive_generator(g))
    other = matching_loss(embed, x, class_members(y, 10), x[perm], cfg, g, derive_generator(g))
    assert same < 1e-9 and other > 1e-3, (same.item(), other.item())


def test_synthetic_images_get_a_nonzero_gradient():
    x, y = _digits()
    syn = torch.cat([x[y == c][:2] for c in range(10)]).clone().requires_grad_(True)
    cfg = DistributionMatchingConfig(ipc=2, real_batch=16)
    g = torch.Generator().manual_seed(0)
    embed = _backbone(CNN, (1, 8, 8), g)
    (grad,) = torch.autograd.grad(matching_loss(embed, x, class_members(y, 10), syn, cfg, g, g), syn)
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def _context(x, y, arch, seed):
    def make(g):
        model = build_model(arch, tuple(x.shape[1:]), 10)
        initialize(model, "kaiming", g)
        return model

    return SelectContext(x=x, y=y, num_classes=10, make_model=make, epochs=1,
                         generator=torch.Generator().manual_seed(seed))


def test_same_seed_is_bit_identical_and_another_seed_differs():
    x, y = _digits(per_class=20)
    cfg = DistributionMatchingConfig(ipc=2, iterations=5, real_batch=8, lr_img=0.1)
    a = select_distribution_matching(_context(x, y, CNN, 3), cfg)
    b = select_distribution_matching(_context(x, y, CNN, 3), cfg)
    c = select_distribution_matching(_context(x, y, CNN, 4), cfg)
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 1, 8, 8) and len(a.history) == 5


def test_random_embeddings_lower_the_loss_on_vectors():
    x, y = _digits(images=False, per_class=40)
    cfg = DistributionMatchingConfig(ipc=1, iterations=60, real_batch=40, lr_img=0.1)
    out = select_distribution_matching(_context(x, y, MLPConfig(hidden=[64]), 0), cfg)
    assert out.images.shape == (10, 64)
    first, last = sum(out.history[:10]) / 10, sum(out.history[-10:]) / 10
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
