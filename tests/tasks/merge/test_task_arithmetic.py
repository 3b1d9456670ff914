import pytest
import torch

from tasks.merge.task_arithmetic import merge_task_vectors, task_vectors


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def test_lambda_zero_is_base_and_one_task_at_one_is_that_model():
    base, ft = _sd(0), _sd(1)
    taus = task_vectors(base, [ft])
    for name, w in merge_task_vectors(base, taus, 0.0).items():
        assert torch.equal(w, base[name])
    for name, w in merge_task_vectors(base, taus, 1.0).items():
        torch.testing.assert_close(w, ft[name])


def test_add_then_subtract_is_identity():
    base, ft1, ft2 = _sd(0), _sd(1), _sd(2)
    taus = task_vectors(base, [ft1, ft2])
    added = merge_task_vectors(base, taus, 0.4)
    back = merge_task_vectors(added, taus, -0.4)
    for name in base:
        torch.testing.assert_close(back[name], base[name], atol=1e-6, rtol=0)


def test_mismatched_shape_names_the_tensor():
    base, ft = _sd(0), _sd(1)
    ft["b"] = torch.zeros(6)
    with pytest.raises(ValueError, match="'b'"):
        task_vectors(base, [ft])
