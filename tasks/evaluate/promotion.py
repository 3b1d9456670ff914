"""The promotion gate: does this run's model replace the current champion?

A rule declared in params (``PromotionConfig``), applied to rows of ``metrics/summary.csv``:
the candidate is one artifact of the run evaluated on one split; it is promoted when its
accuracy is at most ``max_accuracy_drop`` below the champion's on the same split and it meets
the absolute limits on size and latency that are set. With no champion yet only the absolute
limits apply. ``decide`` is pure; the decision, its reason (one sentence naming every check
and its numbers) and the run it came from are recorded by ``champion_record``.

The record of a promoted candidate is the next run's champion: ``decide(row, record["candidate"],
cfg)``. The comparison is of point estimates; the champion's per-example predictions are not
kept, so a paired test (``statistics.paired_difference``) needs both models re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

# Accuracies are k/N; a drop equal to the limit must pass despite 0.9 − 0.002 ≠ 0.898 in floats.
_TOLERANCE = 1e-9


class PromotionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(default="train", min_length=1,
                          description="the run's candidate artifact, as in summary.csv (e.g. quantize/int4)")
    evaluated_on: str = Field(default="test", min_length=1, description="the split the candidate is judged on")
    max_accuracy_drop: float = Field(default=0.002, ge=0.0, le=1.0,
                                     description="largest allowed drop below the champion's accuracy, as a "
                                                 "fraction (0.002 = 0.2 points)")
    max_size_bytes: int | None = Field(default=None, gt=0, description="largest size on disk, bytes; None: no limit")
    max_latency_ms_b1: float | None = Field(default=None, gt=0,
                                            description="largest median latency at batch 1, ms; None: no limit")
    enabled: bool = Field(default=True, description="false: every candidate is recorded as not promoted")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # one sentence naming every check and its numbers
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed


def _require(row: dict, name: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)} (a metrics/summary.csv row has them)")


def _label(row: dict) -> str:
    return f"{row['artifact']}@{row.get('evaluated_on', '?')}"


def _accuracy_check(candidate: dict, champion: dict, max_drop: float) -> tuple[bool, str]:
    cand, champ = float(candidate["accuracy"]), float(champion["accuracy"])
    drop = champ - cand
    ok = drop <= max_drop + _TOLERANCE
    where = f"{abs(drop) * 100:.2f} points {'below' if drop > 0 else 'above'}" if drop else "equal to"
    verdict = "within" if ok else "more than"
    return ok, (f"accuracy {cand:.4f} is {where} champion {_label(champion)} {champ:.4f}, "
                f"{verdict} the {max_drop * 100:.2f} points allowed")


def _limit_check(value: float, limit: float, what: str, unit: str, fmt: str) -> tuple[bool, str]:
    ok = value <= limit
    return ok, f"{what} {value:{fmt}} {unit} is {'within' if ok else 'over'} the {limit:{fmt}} {unit} limit"


def decide(candidate: dict, champion: dict | None, cfg: PromotionConfig) -> Decision:
    """Whether ``candidate`` (a summary row as a dict) replaces ``champion`` (one, or None)."""
    if not cfg.enabled:
        return Decision(False, "promotion disabled", {})
    _require(candidate, "candidate", ("artifact",))
    if (candidate["artifact"], candidate.get("evaluated_on", cfg.evaluated_on)) != (cfg.artifact, cfg.evaluated_on):
        raise ValueError(f"candidate: {_label(candidate)} is not the configured candidate "
                         f"{cfg.artifact}@{cfg.evaluated_on}")
    checks, clauses = {}, []
    if champion is None:
        clauses.append("no champion yet")
    else:
        _require(candidate, "candidate", ("accuracy",))
        _require(champion, "champion", ("artifact", "accuracy"))
        if champion.get("evaluated_on", cfg.evaluated_on) != cfg.evaluated_on:
            raise ValueError(f"champion: evaluated on {champion['evaluated_on']!r}, the candidate on "
                             f"{cfg.evaluated_on!r}; accuracies on different splits do not compare")
        checks["accuracy"], text = _accuracy_check(candidate, champion, cfg.max_accuracy_drop)
        clauses.append(text)
    if cfg.max_size_bytes is not None:
        _require(candidate, "candidate", ("size_bytes",))
        checks["size_bytes"], text = _limit_check(int(candidate["size_bytes"]), cfg.max_size_bytes,
                                                  "size", "bytes", ",d")
        clauses.append(text)
    if cfg.max_latency_ms_b1 is not None:
        _require(candidate, "candidate", ("latency_ms_b1",))
        checks["latency_ms_b1"], text = _limit_check(float(candidate["latency_ms_b1"]), cfg.max_latency_ms_b1,
                                                     "latency at batch 1", "ms", ".3f")
        clauses.append(text)
    if len(clauses) == 1 and champion is None:
        clauses.append("no size or latency limit set")
    promote = all(checks.values())
    verdict = "promoted" if promote else f"not promoted (failed: {', '.join(k for k, v in checks.items() if not v)})"
    return Decision(promote, f"{_label(candidate)} {verdict}: {'; '.join(clauses)}.", checks)


def candidate_row(summary: pd.DataFrame, cfg: PromotionConfig) -> dict:
    """The summary row of the configured candidate, as a dict of plain Python values."""
    rows = summary[(summary.artifact == cfg.artifact) & (summary.evaluated_on == cfg.evaluated_on)]
    if rows.empty:
        have = sorted(summary.loc[summary.evaluated_on == cfg.evaluated_on, "artifact"].unique())
        raise ValueError(f"promotion.artifact: {cfg.artifact!r} has no row evaluated on {cfg.evaluated_on!r} "
                         f"in the summary; evaluated there: {', '.join(have) or 'none'}")
    return _plain(rows.iloc[0].to_dict())


def _plain(value):
    """``value`` with numpy scalars and tuples made JSON-able (nested dicts and lists too)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def champion_record(candidate: dict, decision: Decision, run_info: dict) -> dict:
    """The JSON-able record of one decision: {timestamp, promoted, reason, checks, candidate, run}.

    ``run_info`` is what identifies the run (commit, params hash, data version, ...) and must
    hold ``timestamp``, an ISO 8601 time the caller reads from the clock, so this stays pure."""
    stamp = run_info.get("timestamp")
    try:
        datetime.fromisoformat(str(stamp))
    except ValueError:
        raise ValueError(f"run_info.timestamp: {stamp!r} is not an ISO 8601 time "
                         "(e.g. datetime.now(timezone.utc).isoformat())") from None
    return {"timestamp": str(stamp), "promoted": decision.promote, "reason": decision.reason,
            "checks": dict(decision.checks), "candidate": _plain(candidate),
            "run": _plain({k: v for k, v in run_info.items() if k != "timestamp"})}
