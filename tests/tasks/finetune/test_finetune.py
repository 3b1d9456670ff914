import torch

from slimforge.models import MLPConfig, build_model
from slimforge.transforms import apply_transform
from tasks.finetune import FinetuneConfig, finetune
from tasks.train.init import initialize


def _base_and_data():
    g = torch.Generator().manual_seed(0)
    base = build_model(MLPConfig(hidden=[32]), (1, 8, 8), 10)
    initialize(base, "kaiming", g)  # in place
    return base, torch.rand(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)


def test_head_only_leaves_the_backbone_bit_identical():
    base, x, y = _base_and_data()
    model = finetune(base, x, y, FinetuneConfig(method="head", epochs=1, batch_size=32), torch.Generator())
    for (name, p), q in zip(base.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(base.head.weight, model.head.weight)


def test_full_changes_the_backbone_and_not_the_base():
    base, x, y = _base_and_data()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = finetune(base, x, y, FinetuneConfig(method="full", epochs=1, batch_size=32), torch.Generator())
    assert not torch.equal(model.backbone[1].weight, base.backbone[1].weight)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_transforms_keep_shape_and_are_involutions_where_expected():
    x = torch.rand(4, 1, 8, 8)
    for name in ("hflip", "vflip", "invert", "rotate180"):
        out = apply_transform(name, x)
        assert out.shape == x.shape
        torch.testing.assert_close(apply_transform(name, out), x)
    assert torch.equal(apply_transform("rotate90", apply_transform("rotate90", x)), apply_transform("rotate180", x))
