import math

import pytest
import torch

from slimforge.models import CNNConfig, build_model, weight_params
from tasks.train.init import initialize
from tasks.train.inits.effective_rank import effective_rank, entropy_rank
from tasks.train.inits.kaiming import kaiming


def _as_matrix(w):
    return w.detach().reshape(w.shape[0], -1)  # (out, in·kh·kw), float32: rank tolerance of float32


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (32, 16, 3, 3)])
@pytest.mark.parametrize("rank", [1, 4, 16, "full"])
def test_rank_and_norm(shape, rank):
    w = effective_rank(torch.empty(shape), torch.Generator().manual_seed(0), rank=rank)
    m = _as_matrix(w)
    expected = min(m.shape) if rank == "full" else rank
    assert w.shape == shape and w.dtype == torch.float32
    assert torch.linalg.matrix_rank(m).item() == expected
    ref = kaiming(torch.empty(shape), torch.Generator().manual_seed(1)).double().norm().item()
    assert abs(m.double().norm().item() / ref - 1) < 0.03


def test_rank_is_capped_at_the_matrix_size():
    w = effective_rank(torch.empty(10, 64), torch.Generator().manual_seed(0), rank=16)
    assert torch.linalg.matrix_rank(w).item() == 10


def test_entropy_rank_of_full_is_far_above_rank_one():
    g = torch.Generator().manual_seed(0)
    low = entropy_rank(effective_rank(torch.empty(256, 256), g, rank=1))
    four = entropy_rank(effective_rank(torch.empty(256, 256), g, rank=4))
    full = entropy_rank(effective_rank(torch.empty(256, 256), g, rank="full"))
    assert low == pytest.approx(1.0, abs=1e-3)
    assert 2.0 < four <= 4.0 + 1e-6
    assert full > 50 * low


def test_entropy_rank_of_identity_is_its_size():
    assert entropy_rank(torch.eye(7)) == pytest.approx(7.0)


def test_every_layer_of_a_cnn_gets_the_rank():
    model = build_model(CNNConfig(), (1, 28, 28), 10)
    initialize(model, {"scheme": "effective_rank", "rank": 2}, torch.Generator().manual_seed(0))
    for name, w in weight_params(model).items():
        assert torch.linalg.matrix_rank(_as_matrix(w)).item() == 2, name
        fan_in = math.prod(w.shape[1:])
        expected = math.sqrt(2 / fan_in * w.numel())
        assert abs(w.double().norm().item() / expected - 1) < 1e-5, name
