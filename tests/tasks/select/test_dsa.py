import pytest
import torch

from tasks.select.dsa import (
    DIGIT_STRATEGY,
    Augmentation,
    apply_augmentation,
    batch_augment,
    sample_augmentation,
    siamese_augment,
)

OPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def _images(n=6, seed=0):
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", OPS)
def test_siamese_applies_the_same_transform_to_both_batches(op):
    x = _images()
    for seed in range(5):  # several draws, so a random op that changes x is among them
        a, b = siamese_augment(x, x.clone(), [op], torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
    # one transform for the whole batch: identical images stay identical to each other
    same = x[:1].expand(4, -1, -1, -1).contiguous()
    a, _ = siamese_augment(same, same, [op], torch.Generator().manual_seed(3))
    assert torch.equal(a, a[:1].expand_as(a))


@pytest.mark.parametrize("op", OPS)
def test_gradients_reach_the_input(op):
    x = _images().requires_grad_(True)
    aug = Augmentation(op, {"color": torch.tensor([[0.3, 0.7, 0.2]]), "crop": torch.tensor([[1.0, -2.0]]),
                            "cutout": torch.tensor([[5.0, 6.0]]), "flip": torch.tensor([[1.0]]),
                            "scale": torch.tensor([[1.1, 0.9]]), "rotate": torch.tensor([[0.2]])}[op])
    weights = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    (apply_augmentation(x, aug) * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_crop_is_an_exact_integer_shift_with_zero_fill():
    x = _images()
    y = apply_augmentation(x, Augmentation("crop", torch.tensor([[2.0, -3.0]])))
    assert torch.equal(y[:, :, :10, 3:], x[:, :, 2:, :9])
    assert torch.equal(y[:, :, 10:], torch.zeros_like(y[:, :, 10:]))
    assert torch.equal(y[:, :, :, :3], torch.zeros_like(y[:, :, :, :3]))


def test_neutral_parameters_leave_images_unchanged():
    x = _images()
    for op, p in [("scale", [[1.0, 1.0]]), ("rotate", [[0.0]]), ("crop", [[0.0, 0.0]]), ("flip", [[0.0]])]:
        y = apply_augmentation(x, Augmentation(op, torch.tensor(p)))
        assert (y - x).abs().max() < 1e-5, op


def test_deterministic_per_generator_seed():
    x = _images()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([siamese_augment(x, x, DIGIT_STRATEGY, g)[0] for _ in range(6)])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_batch_augment_draws_per_example_and_skips_non_images():
    same = _images(1).expand(16, -1, -1, -1).contiguous()
    out = batch_augment(["rotate"])(same, torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], out[1])  # per-example angles
    vectors = torch.rand(5, 64)
    assert batch_augment()(vectors, torch.Generator()) is vectors
    a, b = siamese_augment(vectors, vectors[:2], DIGIT_STRATEGY, torch.Generator())
    assert a is vectors


def test_sample_draws_only_from_the_strategy():
    g = torch.Generator().manual_seed(0)
    ops = {sample_augmentation(DIGIT_STRATEGY, 1, (12, 12), g).op for _ in range(200)}
    assert ops == set(DIGIT_STRATEGY)  # every listed op is used, flip never
