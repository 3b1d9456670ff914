"""merge stage runner: combine task models, on three kinds of input.

- The pipeline's own task models (default): θ₀ is the train artifact, the task models are the
  finetune artifacts; backbones are merged by ``merge.method`` (``runners.RUNNERS``) and every
  task keeps its head, written as one multi-head artifact. With ``merge.patch`` each task
  vector is also written as a compact patch (``patches/<task>.safetensors``) and the patched
  base is scored on its task.
- ``merge.checkpoints`` (task-vector methods and ``average``): any safetensors checkpoints
  sharing a base, merged tensor by tensor from memory-mapped files (``streaming``); the
  artifact is the merged checkpoint (``format: checkpoint``), with no head to evaluate.
- ``weight_matching``: model artifacts trained from different inits (``merge.models``), aligned
  by permutation and interpolated; the loss barrier along the path before and after alignment
  is measured on the validation split and plotted (``barrier.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta, save_tensors, write_meta
from slimforge.checkpoint import load_model, multihead_tensors, save_model
from slimforge.data import load_dataset
from tasks.merge.barrier import (
    classifier_evaluator,
    interpolation_curve,
    loss_barrier,
    plot_barrier,
)
from tasks.merge.checkpoints import open_inputs
from tasks.merge.patches import apply_patches, make_patch
from tasks.merge.runners import RUNNERS, TaskSet
from tasks.merge.streaming import stream_merge
from tasks.merge.task_arithmetic import TaskVectorConfig
from tasks.merge.weight_matching import align_and_merge, apply_permutation, permutation_spec


def run(params, ws, fanout=None) -> dict:
    cfg = params.merge
    if getattr(cfg, "checkpoints", None) is not None:
        return _run_checkpoints(cfg, ws)
    if cfg.method == "weight_matching":
        return _run_weight_matching(cfg, ws)
    return _run_tasks(cfg, ws)


def _task_set(ws) -> tuple[TaskSet, list]:
    ds = load_dataset(ws.artifact("ingest"))
    xv, yv = ds.part("val")
    base = load_model(ws.artifact("train"))
    dirs = sorted(p for p in ws.artifact("finetune").iterdir() if p.is_dir())
    models = [load_model(p) for p in dirs]
    specs = [read_meta(p)["task"] for p in dirs]
    ts = TaskSet(names=[p.name for p in dirs], transforms=[s.get("transform", "identity") for s in specs],
                 relabels=[s.get("relabel", "identity") for s in specs],
                 template=base, base=dict(base.backbone.state_dict()),
                 finetuned=[dict(m.backbone.state_dict()) for m in models],
                 heads=[dict(m.head.state_dict()) for m in models], x_val=xv, y_val=yv)
    return ts, dirs


def _run_tasks(cfg, ws) -> dict:
    ts, _ = _task_set(ws)
    merged, report = RUNNERS[cfg.method](ts, cfg)
    report["val_accuracy_by_task"] = dict(zip(ts.names, (round(a, 6) for a in ts.accuracies(merged)), strict=True))
    report["finetuned_val_accuracy_by_task"] = {n: round(ts.accuracies(ft)[k], 6)
                                                for k, (n, ft) in enumerate(zip(ts.names, ts.finetuned, strict=True))}
    heads = dict(zip(ts.names, ts.heads, strict=True))
    with atomic_dir(ws.artifact("merge")) as d:
        save_model(d, multihead_tensors(merged, heads), read_meta(ws.artifact("train"))["model"], root=ws.root,
                   stage="merge", method=cfg.method, config=cfg.model_dump(mode="json"), seed=getattr(cfg, "seed", None),
                   parents={"base": ws.artifact("train"), "tasks": ws.artifact("finetune")}, format="multihead",
                   extra={**{k: v for k, v in report.items() if k in ("lambda", "rescale")}, "tasks": ts.names,
                          "task_specs": {n: {"transform": t, "relabel": r} for n, t, r
                                         in zip(ts.names, ts.transforms, ts.relabels, strict=True)}})
        if getattr(cfg, "patch", None) is not None:
            report["patches"] = _write_patches(ts, cfg.patch, d / "patches")
    return {"method": cfg.method, **report}


def _write_patches(ts: TaskSet, patch_cfg, directory: Path) -> dict:
    """Each task vector as a compact patch; the patched base scored on its own task."""
    directory.mkdir()
    full = sum(t.numel() * t.element_size() for t in ts.base.values())
    out = {}
    for k, (name, tau) in enumerate(zip(ts.names, ts.taus, strict=True)):
        patch = make_patch(tau, patch_cfg)
        save_tensors(directory / f"{name}.safetensors", patch.tensors,
                     metadata={"layout": json.dumps(patch.layout), "bits": str(patch.bits)})
        patched = apply_patches(ts.base, [(patch, 1.0)])
        out[name] = {"bytes": patch.nbytes, "full_backbone_bytes": full,
                     "compression": round(full / patch.nbytes, 3),
                     "val_accuracy": round(ts.accuracies(patched)[k], 6),
                     "tau_norm_by_tensor": {n: round(float(t.float().norm()), 6) for n, t in tau.items()
                                            if t.is_floating_point()}}
    return out


def _run_checkpoints(cfg, ws) -> dict:
    inputs = cfg.checkpoints
    base, models = open_inputs(inputs)
    with atomic_dir(ws.artifact("merge")) as d:
        summary = stream_merge(base, models, d / WEIGHTS, _checkpoint_lambda(cfg, len(models)), _as_task_vector(cfg),
                               include=inputs.include,
                               rescale=(cfg.rescales or [None])[0] if cfg.method == "dare" else None)
        write_meta(d, root=ws.root, stage="merge", method=cfg.method, config=cfg.model_dump(mode="json"),
                   seed=getattr(cfg, "seed", None), extra={"format": "checkpoint"},
                   parents={"base": Path(inputs.base), **{f"model{i}": Path(p) for i, p in enumerate(inputs.models)}})
    return {"method": cfg.method, "format": "checkpoint", **summary}


def _checkpoint_lambda(cfg, k: int) -> float:
    return 1.0 / k if cfg.method == "average" else cfg.lambdas[0]


def _as_task_vector(cfg):
    """``average`` of checkpoints is task arithmetic at λ = 1/K."""
    return TaskVectorConfig() if cfg.method == "average" else cfg


def _run_weight_matching(cfg, ws) -> dict:
    ds = load_dataset(ws.artifact("ingest"))
    xv, yv = ds.part("val")
    models = [load_model(Path(p)) for p in cfg.models]
    states = [dict(m.state_dict()) for m in models]
    spec = permutation_spec(models[0])
    merged, perms = align_and_merge(spec, states, cfg, torch.Generator().manual_seed(cfg.seed))
    evaluate = classifier_evaluator(models[0], xv, yv)  # state -> (val loss, val accuracy)
    alphas = [i / 10 for i in range(11)]
    aligned_b = apply_permutation(spec, perms[1], states[1])
    curves = {"naive": interpolation_curve(states[0], states[1], evaluate, alphas),
              "weight matching": interpolation_curve(states[0], aligned_b, evaluate, alphas)}
    report = {"loss_barrier": {k: round(loss_barrier(c), 6) for k, c in curves.items()},
              "curves": curves, "val_accuracy": round(evaluate(merged)[1], 6)}
    with atomic_dir(ws.artifact("merge")) as d:
        save_model(d, merged, read_meta(Path(cfg.models[0]))["model"], root=ws.root, stage="merge",
                   method=cfg.method, config=cfg.model_dump(mode="json"), seed=cfg.seed,
                   parents={f"model{i}": Path(p) for i, p in enumerate(cfg.models)})
        plot_barrier(curves, d / "barrier.png")
    return {"method": cfg.method, **report}
