import pytest
import torch

from slimforge.transforms import RELABELS, TRANSFORMS, apply_relabel, apply_transform, task_data


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS) - {"identity"}))
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


def test_relabellings_map_digits_to_fewer_classes():
    y = torch.arange(10)
    assert apply_relabel("parity", y).tolist() == [0, 1] * 5
    assert apply_relabel("high", y).tolist() == [0] * 5 + [1] * 5
    assert apply_relabel("prime", y).tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 0, 0]
    assert apply_relabel("mod3", y).max() == 2 and torch.equal(apply_relabel("identity", y), y)
    x = torch.rand(10, 1, 4, 4)
    tx, ty = task_data("identity", "parity", x, y)
    assert torch.equal(tx, x) and torch.equal(ty, y % 2)
    with pytest.raises(ValueError, match="parity"):
        apply_relabel("odd", y)
    assert set(RELABELS) >= {"identity", "parity", "mod3", "high", "prime"}
