"""Each method against its stage's baseline, paired on the same test examples.

Baselines: a quantize variant against the plain RTN variant of the same run at the same bits and
grid (GPTQ, AWQ, FlexRound, … must beat round-to-nearest); a merge against the uniform soup of
the same task models (``slimforge.averaging``), built here because the run may not contain one.
A pair is compared on the examples both were scored on (``statistics.paired_difference``: the
accuracy difference, its paired-bootstrap 95% interval and an exact McNemar p-value).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.evaluate.schema import validate_comparisons
from tasks.evaluate.statistics import paired_difference

_GRID = ("bits", "granularity", "group_size", "symmetric")


def rtn_twin(config: dict, others: dict[str, dict]) -> str | None:
    """The name of the plain RTN variant (no LoRC, input-axis groups) sharing ``config``'s grid."""
    if config.get("method", "rtn") == "rtn" and not config.get("lorc_rank"):
        return None
    for name, other in sorted(others.items()):
        plain = other.get("method", "rtn") == "rtn" and not other.get("lorc_rank") \
            and other.get("group_axis", "input") == "input"
        if plain and all(other.get(k) == config.get(k) for k in _GRID):
            return name
    return None


def quantize_pairs(configs: dict[str, dict]) -> list[tuple[str, str]]:
    """(variant artifact, its RTN baseline artifact) for every variant that has one."""
    pairs = []
    for name, cfg in configs.items():
        twin = rtn_twin(cfg, {n: c for n, c in configs.items() if n != name})
        if twin is not None:
            pairs.append((f"quantize/{name}", f"quantize/{twin}"))
    return pairs


def compare(pairs: list[tuple[str, str, str, str]], correct: dict[tuple[str, str], np.ndarray],
            seed: int, n_boot: int) -> pd.DataFrame:
    """Rows (artifact, evaluated_on, baseline, difference, low, high, p_value, n) for each
    (artifact, evaluated_on, baseline label, baseline key) whose per-example results exist."""
    rows = []
    for artifact, evaluated_on, label, key in pairs:
        a, b = correct.get((artifact, evaluated_on)), correct.get((key, evaluated_on))
        if a is None or b is None:
            continue
        d = paired_difference(a, b, np.random.default_rng(seed), n_boot=n_boot)
        rows.append({"artifact": artifact, "evaluated_on": evaluated_on, "baseline": label,
                     "difference": d["difference"], "low": d["low"], "high": d["high"],
                     "p_value": d["p_value"], "n": d["n"]})
    columns = ["artifact", "evaluated_on", "baseline", "difference", "low", "high", "p_value", "n"]
    return validate_comparisons(pd.DataFrame(rows, columns=columns))
