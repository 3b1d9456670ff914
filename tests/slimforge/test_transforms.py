import pytest
import torch

from slimforge.transforms import TRANSFORMS, apply_transform


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_keeps_the_shape_is_deterministic_and_changes_the_data(name):
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = apply_transform(name, x)
    assert y.shape == x.shape and torch.equal(y, apply_transform(name, x.clone()))
    assert not torch.equal(y, x)


def test_rotations_compose_and_blur_keeps_the_mean_of_a_constant():
    x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(apply_transform("rotate270", apply_transform("rotate90", x)), x)
    assert torch.equal(apply_transform("blur", torch.full((1, 1, 4, 4), 0.25)), torch.full((1, 1, 4, 4), 0.25))
    assert apply_transform("blur", torch.rand(3, 20)).shape == (3, 20)


def test_unknown_transform_names_the_valid_ones():
    with pytest.raises(ValueError, match="rotate270"):
        apply_transform("rotate45", torch.zeros(1, 1, 2, 2))
