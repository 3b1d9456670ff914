"""train stage runner: the selected training set in, a trained model artifact out."""

from __future__ import annotations

import torch

from slimforge.artifacts import atomic_dir, load_tensors
from slimforge.checkpoint import build_from_spec, model_spec, save_model
from slimforge.data import load_dataset
from slimforge.training import accuracy, fit
from tasks.train.init import initialize


def run(params, ws, fanout=None) -> dict:
    cfg = params.train
    ds = load_dataset(ws.artifact("ingest"))
    kept = load_tensors(ws.artifact("select", "indices.safetensors"))["indices"]
    spec = model_spec(cfg.model, ds.input_shape, ds.num_classes)
    g = torch.Generator().manual_seed(cfg.seed)
    model = initialize(build_from_spec(spec), cfg.init, g)
    history = fit(model, ds.x[kept], ds.y[kept], cfg.fit_config(), g, label="train")
    val_acc = accuracy(model, *ds.part("val"))
    with atomic_dir(ws.artifact("train")) as d:
        save_model(d, model.state_dict(), spec, root=ws.root, stage="train", method=cfg.init,
                   config=cfg.model_dump(mode="json"), seed=cfg.seed,
                   parents={"dataset": ws.artifact("ingest"), "selection": ws.artifact("select")})
    return {"train_examples": len(kept), "final_train_loss": round(history[-1], 6),
            "val_accuracy": round(val_acc, 6)}
