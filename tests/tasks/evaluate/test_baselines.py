import json

import numpy as np
import pandas as pd
import pytest

from tasks.evaluate.baselines import compare, quantize_pairs, rtn_twin
from tasks.evaluate.promotion import PromotionConfig
from tasks.evaluate.stage import promote

CONFIGS = {
    "int4": {"method": "rtn", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
    "int8": {"method": "rtn", "bits": 8, "granularity": "channel", "group_size": 128, "symmetric": True},
    "gptq4": {"method": "gptq", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
    "gptq4_g64": {"method": "gptq", "bits": 4, "granularity": "group", "group_size": 64, "symmetric": False},
    "int4_lorc": {"method": "rtn", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False,
                  "lorc_rank": 4},
}


def test_each_method_is_paired_with_the_rtn_variant_of_its_own_grid_only():
    pairs = quantize_pairs(CONFIGS)
    assert ("quantize/gptq4", "quantize/int4") in pairs and ("quantize/int4_lorc", "quantize/int4") in pairs
    assert not any(a in ("quantize/int4", "quantize/int8", "quantize/gptq4_g64") for a, _ in pairs)
    assert rtn_twin(CONFIGS["gptq4_g64"], CONFIGS) is None


def test_compare_reports_the_paired_difference_and_skips_missing_results():
    a = np.r_[np.ones(510, bool), np.zeros(490, bool)]
    b = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    table = compare([("m", "test", "base", "b"), ("m", "task", "base", "b")], {("m", "test"): a, ("b", "test"): b},
                    seed=0, n_boot=500)
    assert len(table) == 1 and table.difference[0] == pytest.approx(0.01) and table.n[0] == 1000
    assert table.low[0] <= 0.01 <= table.high[0]


def _summary(acc):
    return pd.DataFrame([{"artifact": "quantize/int8", "evaluated_on": "test", "accuracy": acc,
                          "size_bytes": 1000, "latency_ms_b1": 0.1}])


def test_a_promoted_candidate_becomes_the_champion_and_a_worse_one_does_not(tmp_path):
    path, cfg = tmp_path / "runs" / "champion.json", PromotionConfig(artifact="quantize/int8")
    assert promote(_summary(0.98), cfg, path)["promote"] and json.loads(path.read_text())["candidate"]["accuracy"] == 0.98
    worse = promote(_summary(0.97), cfg, path)
    assert not worse["promote"] and "accuracy" in worse["reason"]
    assert json.loads(path.read_text())["candidate"]["accuracy"] == 0.98  # the champion stays
    assert promote(_summary(0.979), cfg, path)["promote"]  # within 0.2 points
    disabled = promote(_summary(0.99), PromotionConfig(enabled=False), tmp_path / "other.json")
    assert not disabled["promote"] and not (tmp_path / "other.json").exists()
