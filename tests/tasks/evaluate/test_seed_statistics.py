import pandas as pd
import pytest

from tasks.evaluate.stage import seed_statistics


def _summary(accs):
    rows = [{"artifact": "train" if i == 0 else f"train/seed-{i}", "stage": "train", "evaluated_on": "test",
             "accuracy": a} for i, a in enumerate(accs)]
    rows.append({"artifact": "prune", "stage": "prune", "evaluated_on": "test", "accuracy": 0.1})
    rows.append({"artifact": "train", "stage": "train", "evaluated_on": "tasks-mean", "accuracy": 0.2})
    rows.append({"artifact": "train/random_baseline", "stage": "train", "evaluated_on": "test", "accuracy": 0.3})
    return pd.DataFrame(rows)


def test_constant_metric_has_a_zero_width_interval():
    out = seed_statistics(_summary([0.9, 0.9, 0.9]))
    assert out["n"] == 3 and out["std"] == 0.0 and out["ci95"] == [0.9, 0.9]


def test_mean_std_and_t_interval():
    out = seed_statistics(_summary([0.90, 0.92, 0.94]))
    assert out["mean"] == pytest.approx(0.92)
    assert out["std"] == pytest.approx(0.02)
    half = 4.302653 * 0.02 / 3**0.5  # t_{0.975, 2}
    assert out["ci95"] == pytest.approx([0.92 - half, 0.92 + half], abs=1e-6)
    low, high = out["ci95_bootstrap"]
    assert 0.90 <= low <= 0.92 <= high <= 0.94  # resampling 3 values never leaves their range


def test_single_run_has_no_spread():
    assert seed_statistics(_summary([0.9])) == {"n": 1, "mean": 0.9}
