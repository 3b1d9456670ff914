"""merge stage runner: task arithmetic over the backbones of the task models.

lambda is the grid value with the best mean validation accuracy over the tasks, each task
evaluated with its own fine-tuned head on top of the merged backbone.
"""

from __future__ import annotations

from slimforge.artifacts import atomic_dir, read_meta
from slimforge.checkpoint import load_model, multihead_tensors, save_model
from slimforge.data import load_dataset
from slimforge.training import accuracy
from slimforge.transforms import apply_transform
from tasks.merge.task_arithmetic import merge_task_vectors, task_vectors


def _backbone(model) -> dict:
    return {k: v for k, v in model.backbone.state_dict().items()}


def run(params, ws, fanout=None) -> dict:
    cfg = params.merge
    ds = load_dataset(ws.artifact("ingest"))
    xv, yv = ds.part("val")
    base = load_model(ws.artifact("train"))
    task_dirs = sorted(p for p in ws.artifact("finetune").iterdir() if p.is_dir())
    tasks = {p.name: (read_meta(p)["task"]["transform"], load_model(p)) for p in task_dirs}
    taus = task_vectors(_backbone(base), [_backbone(m) for _, m in tasks.values()])

    def score(lam: float) -> float:
        merged = merge_task_vectors(_backbone(base), taus, lam)
        accs = []
        for transform, model in tasks.values():
            probe = load_model(ws.artifact("train"))
            probe.backbone.load_state_dict(merged)
            probe.head.load_state_dict(model.head.state_dict())
            accs.append(accuracy(probe, apply_transform(transform, xv), yv))
        return sum(accs) / len(accs)

    curve = {lam: score(lam) for lam in cfg.lambdas}
    best = max(cfg.lambdas, key=lambda lam: (curve[lam], -lam))
    merged = merge_task_vectors(_backbone(base), taus, best)
    heads = {name: m.head.state_dict() for name, (_, m) in tasks.items()}
    with atomic_dir(ws.artifact("merge")) as d:
        save_model(d, multihead_tensors(merged, heads), read_meta(ws.artifact("train"))["model"], root=ws.root,
                   stage="merge", method=cfg.method, config=cfg.model_dump(mode="json"), seed=cfg.seed,
                   parents={"base": ws.artifact("train"), "tasks": ws.artifact("finetune")},
                   format="multihead",
                   extra={"lambda": best, "tasks": list(tasks),
                          "transforms": {n: t for n, (t, _) in tasks.items()}})
    return {"method": cfg.method, "lambda": best,
            "val_accuracy_by_lambda": {str(k): round(v, 6) for k, v in curve.items()}}
