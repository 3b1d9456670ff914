"""select stage runner: reads the ingest artifact, writes kept indices and the score table."""

from __future__ import annotations

import pandas as pd
import torch

from slimforge.artifacts import atomic_dir, save_tensors, write_meta
from slimforge.checkpoint import build_from_spec, model_spec
from slimforge.data import SPLITS, load_dataset
from tasks.select.el2n import El2nConfig, el2n_scores, keep_highest
from tasks.select.random import select_random
from tasks.select.schema import SCORES_SCHEMA
from tasks.train import initialize


def _select(params, ws, ds, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions within the train split, per-example scores or NaN)."""
    cfg = params.select
    g = torch.Generator().manual_seed(cfg.seed)
    if isinstance(cfg, El2nConfig):
        spec = model_spec(params.train.model, ds.input_shape, ds.num_classes)

        def make(gen: torch.Generator):
            model = build_from_spec(spec)
            initialize(model, params.train.init, gen, root=ws.root)
            return model

        scores = el2n_scores(make, x, y, ds.num_classes, cfg, g)
        return keep_highest(scores, cfg.keep_fraction, cfg.offset), scores
    return select_random(y, cfg, g), torch.full((len(y),), float("nan"))


def run(params, ws, fanout=None) -> dict:
    cfg = params.select
    ds = load_dataset(ws.artifact("ingest"))
    ids = torch.nonzero(ds.split == SPLITS["train"]).flatten()  # dataset-level ids of the train split
    x, y = ds.x[ids], ds.y[ids]
    kept, scores = _select(params, ws, ds, x, y)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[kept] = True
    table = SCORES_SCHEMA.validate(pd.DataFrame({
        "id": ids.numpy(), "label": y.numpy(), "score": scores.numpy().astype("float64"),
        "kept": mask.numpy(), "method": cfg.method, "seed": cfg.seed,
    }))
    with atomic_dir(ws.artifact("select")) as d:
        save_tensors(d / "indices.safetensors", {"indices": ids[kept]})
        table.to_csv(d / "scores.csv", index=False)
        write_meta(d, root=ws.root, stage="select", method=cfg.method, config=cfg.model_dump(mode="json"),
                   seed=cfg.seed, parents={"dataset": ws.artifact("ingest")})
    return {"method": cfg.method, "train_examples": len(ids), "kept": int(mask.sum()),
            "kept_fraction": round(float(mask.float().mean()), 6)}
