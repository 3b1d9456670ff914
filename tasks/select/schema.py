"""The per-example score table of the select stage (scores.csv)."""

import pandera.pandas as pa

SCORES_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(int, pa.Check.ge(0), unique=True),
        "label": pa.Column(int, pa.Check.ge(0)),
        "score": pa.Column(float, nullable=True, description="method score; NaN for random"),
        "kept": pa.Column(bool),
        "method": pa.Column(str),
        "seed": pa.Column(int),
    },
    strict=True,
    coerce=True,
)
