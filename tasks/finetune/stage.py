"""finetune stage runner: one fine-tune per task, fanned out by the caller's ``fanout``.

``fanout(fn, items)`` maps ``fn`` over ``items``: the builtin map from the CLI, Prefect's
task runner from the flow. Results come back in memory and are written together, so the
finetune artifact appears whole or not at all.
"""

from __future__ import annotations

import torch

from slimforge.artifacts import atomic_dir, read_meta
from slimforge.checkpoint import load_model, save_model
from slimforge.data import load_dataset
from slimforge.training import accuracy
from slimforge.transforms import task_data
from tasks.finetune.finetune import finetune


def _serial(fn, items):
    return [fn(item) for item in items]


def run(params, ws, fanout=None) -> dict:
    cfg = params.finetune
    ds = load_dataset(ws.artifact("ingest"))
    base = load_model(ws.artifact("train"))
    x, y = ds.part("train")
    xv, yv = ds.part("val")

    def one(k: int):
        task = cfg.tasks[k]
        g = torch.Generator().manual_seed(cfg.seed * 1000 + k)
        model = finetune(base, *task_data(task.transform, task.relabel, x, y), cfg, g, label=f"finetune {task.name}")
        return task.name, model, accuracy(model, *task_data(task.transform, task.relabel, xv, yv))

    results = (fanout or _serial)(one, list(range(len(cfg.tasks))))
    spec = read_meta(ws.artifact("train"))["model"]
    with atomic_dir(ws.artifact("finetune")) as d:
        for k, (name, model, _) in enumerate(results):
            (d / name).mkdir()
            save_model(d / name, model.state_dict(), spec, root=ws.root, stage="finetune", method=cfg.method,
                       config=cfg.model_dump(mode="json"), seed=cfg.seed * 1000 + k,
                       parents={"base": ws.artifact("train"), "dataset": ws.artifact("ingest")},
                       extra={"task": cfg.tasks[k].model_dump()})
    return {"method": cfg.method, "val_accuracy": {name: round(acc, 6) for name, _, acc in results}}
