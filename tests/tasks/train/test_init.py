import math

import pytest
import torch
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.train.init import initialize, kaiming, orthogonal, xavier


def test_kaiming_and_xavier_std():
    w = torch.empty(512, 512)
    g = torch.Generator().manual_seed(0)
    assert abs(kaiming(w, g).std().item() / math.sqrt(2 / 512) - 1) < 0.03
    assert abs(xavier(w, g).std().item() / math.sqrt(2 / 1024) - 1) < 0.03


def test_orthogonal_singular_values_equal_gain():
    w = orthogonal(torch.empty(64, 128), torch.Generator().manual_seed(0), gain=1.5)
    s = torch.linalg.svdvals(w.double())
    assert torch.allclose(s, torch.full_like(s, 1.5), atol=1e-5)


def test_kaiming_keeps_activation_variance_through_depth():
    g = torch.Generator().manual_seed(0)
    model = initialize(build_model(MLPConfig(hidden=[256] * 10), (256,), 10), "kaiming", g)
    x = torch.randn(2048, 256, generator=g)
    variances = []
    for layer in model.backbone:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            variances.append(x.pow(2).mean().item())
    assert max(variances) / min(variances) < 2.0


@pytest.mark.parametrize("cfg,shape", [(MLPConfig(), (1, 28, 28)), (CNNConfig(), (1, 28, 28)),
                                       (ViTConfig(), (1, 28, 28)), (CNNConfig(), (40,)), (ViTConfig(patch=4), (40,))])
def test_same_seed_same_weights_for_every_architecture(cfg, shape):
    a = initialize(build_model(cfg, shape, 10), "kaiming", torch.Generator().manual_seed(3))
    b = initialize(build_model(cfg, shape, 10), "kaiming", torch.Generator().manual_seed(3))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert a(torch.zeros(2, *shape)).shape == (2, 10)


def test_unknown_init_lists_valid_names():
    with pytest.raises(ValueError, match="kaiming, xavier, orthogonal"):
        initialize(nn.Linear(2, 2), "kaimig", torch.Generator())
