import pytest
import torch

from kernels.merge import disjoint_mean
from tasks.merge.task_arithmetic import TaskVectorConfig, merge_task_vectors, task_vectors
from tasks.merge.ties import keep_threshold


def trim(delta, threshold):
    """TIES's trim, written out: entries below the threshold in magnitude set to 0."""
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(40, 30, generator=g), "b": torch.randn(50, generator=g),
            "steps": torch.tensor(seed)}


def test_one_task_vector_at_full_density_and_lambda_one_returns_it():
    base, ft = _sd(0), _sd(1)
    cfg = TaskVectorConfig(method="ties", density=1.0)
    merged = merge_task_vectors(base, task_vectors(base, [ft]), 1.0, cfg)
    for name in ("a", "b"):
        torch.testing.assert_close(merged[name] - base[name], ft[name] - base[name], rtol=0, atol=1e-6)
    assert torch.equal(merged["steps"], base["steps"])  # integer buffers are the base's


def test_elected_sign_wins_and_disagreeing_entries_are_left_out():
    merged = disjoint_mean([torch.tensor([3.0, 1.0, 0.0, -2.0]), torch.tensor([-1.0, 3.0, 0.0, -4.0])])
    # (3, -1): mass +2 elects +, mean of {3} = 3 (not the plain mean 1); (1, 3): mean 2;
    # (0, 0): stays 0; (-2, -4): mean -3.
    assert merged.tolist() == [3.0, 2.0, 0.0, -3.0]


def test_trim_keeps_exactly_the_top_share_by_magnitude():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = trim(delta, keep_threshold(delta.abs(), 0.2))
    assert int((kept != 0).sum()) == 200
    assert kept[kept != 0].abs().min() >= delta[kept == 0].abs().max()


def test_model_scope_ranks_over_the_whole_vector_tensor_scope_per_tensor():
    base = {"big": torch.zeros(100), "small": torch.zeros(100)}
    ft = {"big": torch.full((100,), 10.0) + torch.arange(100.0), "small": torch.arange(100.0) / 100}
    taus = task_vectors(base, [ft])
    model = merge_task_vectors(base, taus, 1.0, TaskVectorConfig(method="ties", density=0.5))
    tensor = merge_task_vectors(base, taus, 1.0, TaskVectorConfig(method="ties", density=0.5, trim_scope="tensor"))
    assert int((model["big"] != 0).sum()) == 100 and int((model["small"] != 0).sum()) == 0
    assert int((tensor["big"] != 0).sum()) == 50 and int((tensor["small"] != 0).sum()) == 50


def test_entries_zero_in_every_trimmed_vector_stay_at_the_base():
    base, ft1, ft2 = _sd(0), _sd(1), _sd(2)
    cfg = TaskVectorConfig(method="ties", density=0.1)
    taus = task_vectors(base, [ft1, ft2])
    thresholds = [keep_threshold(torch.cat([t["a"].abs().flatten(), t["b"].abs()]), 0.1) for t in taus]
    merged = merge_task_vectors(base, taus, 0.7, cfg)
    for name in ("a", "b"):
        untouched = (taus[0][name].abs() < thresholds[0]) & (taus[1][name].abs() < thresholds[1])
        assert untouched.any()
        assert torch.equal(merged[name][untouched], base[name][untouched])


def test_unused_settings_are_refused_with_their_names():
    with pytest.raises(ValueError, match="drop=0.5: unused with method 'ties'"):
        TaskVectorConfig(method="ties", drop=0.5)
