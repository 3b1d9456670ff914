import json

import numpy as np
import pandas as pd
import pydantic
import pytest

from tasks.evaluate.promotion import (
    Decision,
    PromotionConfig,
    candidate_row,
    champion_record,
    decide,
)

STAMP = "2026-11-24T01:00:00+00:00"


def _row(artifact="quantize/int4", accuracy=0.9, size_bytes=1_000_000, latency_ms_b1=0.5, evaluated_on="test"):
    return {"artifact": artifact, "stage": artifact.split("/")[0], "evaluated_on": evaluated_on,
            "accuracy": accuracy, "size_bytes": size_bytes, "latency_ms_b1": latency_ms_b1}


def _cfg(**kw):
    return PromotionConfig(artifact="quantize/int4", **kw)


CHAMPION = _row("train", accuracy=0.9, size_bytes=4_000_000, latency_ms_b1=1.0)


def test_within_the_drop_and_under_the_size_limit_is_promoted():
    d = decide(_row(accuracy=0.8985), CHAMPION, _cfg(max_size_bytes=2_000_000))
    assert d.promote and d.checks == {"accuracy": True, "size_bytes": True}
    assert "0.8985" in d.reason and "0.9000" in d.reason and "1,000,000" in d.reason


def test_a_drop_of_exactly_the_limit_is_promoted():
    assert decide(_row(accuracy=0.898), CHAMPION, _cfg()).promote


def test_better_than_the_champion_is_promoted():
    d = decide(_row(accuracy=0.91), CHAMPION, _cfg())
    assert d.promote and "1.00 points above" in d.reason


def test_three_tenths_of_a_point_worse_is_refused_naming_both_accuracies():
    d = decide(_row(accuracy=0.897), CHAMPION, _cfg(max_size_bytes=2_000_000))
    assert not d.promote and d.checks == {"accuracy": False, "size_bytes": True}
    assert "not promoted" in d.reason and "failed: accuracy)" in d.reason
    assert "0.8970" in d.reason and "0.9000" in d.reason and "0.30 points below" in d.reason
    assert "0.20 points allowed" in d.reason


def test_over_the_size_limit_is_refused_naming_size():
    d = decide(_row(size_bytes=3_000_000), CHAMPION, _cfg(max_size_bytes=2_000_000))
    assert not d.promote and d.checks == {"accuracy": True, "size_bytes": False}
    assert "failed: size_bytes" in d.reason and "3,000,000 bytes is over the 2,000,000 bytes limit" in d.reason


def test_every_failing_check_is_named():
    cfg = _cfg(max_size_bytes=2_000_000, max_latency_ms_b1=0.25)
    d = decide(_row(accuracy=0.85, size_bytes=3_000_000, latency_ms_b1=0.5), CHAMPION, cfg)
    assert not d.promote and not any(d.checks.values())
    assert "failed: accuracy, size_bytes, latency_ms_b1" in d.reason
    assert "latency at batch 1 0.500 ms is over the 0.250 ms limit" in d.reason


def test_no_champion_promotes_when_the_absolute_limits_hold():
    d = decide(_row(), None, _cfg())
    assert d.promote and d.checks == {} and "no champion yet" in d.reason
    d = decide(_row(size_bytes=3_000_000), None, _cfg(max_size_bytes=2_000_000))
    assert not d.promote and "no champion yet" in d.reason and "size" in d.reason


def test_disabled_never_promotes():
    for champion in (None, CHAMPION):
        assert decide(_row(accuracy=0.99), champion, _cfg(enabled=False)) == Decision(False, "promotion disabled", {})


def test_the_reason_is_one_sentence():
    d = decide(_row(accuracy=0.85), CHAMPION, _cfg(max_size_bytes=2_000_000, max_latency_ms_b1=1.0))
    assert d.reason.endswith(".") and d.reason.count(". ") == 0 and "\n" not in d.reason


def test_comparing_different_splits_or_artifacts_is_an_error():
    with pytest.raises(ValueError, match="^champion: evaluated on 'tasks-mean'"):
        decide(_row(), {**CHAMPION, "evaluated_on": "tasks-mean"}, _cfg())
    with pytest.raises(ValueError, match="^candidate: prune@test is not the configured candidate"):
        decide(_row("prune"), CHAMPION, _cfg())
    with pytest.raises(ValueError, match="^candidate: missing size_bytes"):
        decide({k: v for k, v in _row().items() if k != "size_bytes"}, None, _cfg(max_size_bytes=10))


def test_config_rejects_unknown_keys_and_bad_limits():
    with pytest.raises(pydantic.ValidationError, match="max_acc_drop"):
        PromotionConfig(max_acc_drop=0.01)
    with pytest.raises(pydantic.ValidationError, match="max_accuracy_drop"):
        PromotionConfig(max_accuracy_drop=-0.1)
    with pytest.raises(pydantic.ValidationError, match="max_size_bytes"):
        PromotionConfig(max_size_bytes=0)


def test_candidate_row_picks_the_configured_artifact():
    summary = pd.DataFrame([_row("train"), _row(accuracy=0.89), _row(accuracy=0.5, evaluated_on="tasks-mean")])
    row = candidate_row(summary, _cfg())
    assert row["accuracy"] == 0.89 and type(row["size_bytes"]) is int
    with pytest.raises(ValueError, match=r"^promotion.artifact: 'prune' .* evaluated there: quantize/int4, train"):
        candidate_row(summary, PromotionConfig(artifact="prune"))


def test_champion_record_is_json_and_the_next_champion():
    cand = {**_row(accuracy=0.8985), "size_bytes": np.int64(1_000_000), "accuracy": np.float64(0.8985)}
    cfg = _cfg()
    record = champion_record(cand, decide(cand, CHAMPION, cfg), {"timestamp": STAMP, "commit": "abc123"})
    again = json.loads(json.dumps(record))
    assert again == record and record["timestamp"] == STAMP and record["promoted"] is True
    assert record["run"] == {"commit": "abc123"} and record["checks"] == {"accuracy": True}
    # The record's candidate is the champion the next run is judged against.
    assert not decide(_row(accuracy=0.89), again["candidate"], cfg).promote


def test_champion_record_needs_a_timestamp_from_the_caller():
    d = decide(_row(), None, _cfg())
    with pytest.raises(ValueError, match="^run_info.timestamp: None"):
        champion_record(_row(), d, {"commit": "abc123"})
    with pytest.raises(ValueError, match="^run_info.timestamp: 'yesterday'"):
        champion_record(_row(), d, {"timestamp": "yesterday"})
