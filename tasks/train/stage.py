"""train stage runner: the selected training set in, a trained model artifact out.

With ``train.checkpoint_every`` > 0 the run checkpoints into ``runs/train/<key>/step-<k>/``
(outside DVC's outputs, which DVC deletes before a stage runs) and a killed run, started
again, continues from its newest checkpoint to the same weights. ``<key>`` hashes the train
config, the input artifacts and the code, so a changed run never resumes a stale one. The
checkpoints stay after success: ``train.init: rewind`` reads them.

With ``train.distributed`` over more than one process each run trains as a torch DDP run
launched with torchrun (``tasks.train.distributed``); meta.json records its world size and
backend.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from slimforge import artifacts
from slimforge.artifacts import atomic_dir, content_hash
from slimforge.checkpoint import build_from_spec, model_spec, save_model
from slimforge.config import ParamsError
from slimforge.data import load_dataset
from slimforge.training import CHECKPOINT_FIELDS, Checkpointing, EpochPlan, MaskHold, accuracy, fit
from tasks.select.dsa import batch_augment
from tasks.select.output import TrainingSet, training_set
from tasks.train.distributed import check_distributed, fit_distributed
from tasks.train.init import initialize


def run_key(cfg, inputs: dict[str, Path]) -> str:
    """16 hex digits of sha256 over the resolved config (less where checkpoints go), the
    inputs' content hashes and the code version: what a resumed run must share."""
    blob = {"config": cfg.model_dump(mode="json", exclude=set(CHECKPOINT_FIELDS)),
            "inputs": {name: content_hash(path) for name, path in sorted(inputs.items())},
            "code_version": artifacts.code_version("train")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _train_one(params, ws, data: TrainingSet, spec, seed: int):
    """One run of the sweep: (model, per-epoch losses, meta extra)."""
    cfg = params.train
    g = torch.Generator().manual_seed(seed)
    model = build_from_spec(spec)
    masks = initialize(model, cfg.init, g, root=ws.root)
    extra, checkpoint = _distributed_meta(cfg), None
    if cfg.checkpoint_every > 0:
        runs = Path("runs", "train", run_key(cfg, _parents(ws)), f"seed-{seed}")  # workspace-relative
        checkpoint = Checkpointing(ws.root / runs, cfg.checkpoint_every, cfg.keep_checkpoints)
        extra["checkpoints"] = runs.as_posix()
    history = _fit(cfg, spec, model, data.x, data.y, g, masks, label=f"train seed {seed}", checkpoint=checkpoint,
                   plan=data.plan)
    return model, history, extra


def _fit(cfg, spec, model, x, y, g, masks, *, label: str, checkpoint: Checkpointing | None = None,
         plan: EpochPlan | None = None) -> list[float]:
    """``fit`` in this process, or as a DDP run when ``train.distributed`` spans several."""
    if cfg.distributed.world_size > 1:
        return fit_distributed(spec, model, x, y, cfg.fit_config(), g, cfg.distributed, masks=masks, plan=plan,
                               augment=cfg.augment, label=label, checkpoint=checkpoint)
    return fit(model, x, y, cfg.fit_config(), g, hold=MaskHold(model, masks) if masks else None, label=label,
               checkpoint=checkpoint, plan=plan, augment=batch_augment() if cfg.augment == "dsa" else None)


def _distributed_meta(cfg) -> dict:
    if cfg.distributed.world_size == 1:
        return {}
    return {"distributed": {"world_size": cfg.distributed.world_size, "backend": cfg.distributed.resolved_backend()}}


def _parents(ws) -> dict[str, Path]:
    return {"dataset": ws.artifact("ingest"), "selection": ws.artifact("select")}


def _serial(fn, items):
    return [fn(item) for item in items]


def run(params, ws, fanout=None) -> dict:
    """Train ``train.seed`` (and, for a sweep, every ``train.seeds``; fanned out by ``fanout``).

    The main run is artifacts/train/model.safetensors, the one later stages build on; the
    sweep's other runs are artifacts/train/seeds/seed-<s>/.
    """
    cfg = params.train
    ds = load_dataset(ws.artifact("ingest"))
    data = training_set(ws.artifact("select"), ds)
    if cfg.augment == "dsa" and ds.x.dim() != 4:
        raise ParamsError(f"params.yaml: train.augment: 'dsa' needs image inputs (N, C, H, W); "
                          f"this dataset's are {tuple(ds.x.shape[1:])}, use 'none'")
    if cfg.distributed.world_size > 1:
        try:  # before any training: a machine without the GPUs asked for
            check_distributed(cfg.distributed, cfg.batch_size)
        except ValueError as e:
            raise ParamsError(f"params.yaml: {e}") from None
    spec = model_spec(cfg.model, ds.input_shape, ds.num_classes)
    seeds = [cfg.seed, *cfg.seeds]
    results = (fanout or _serial)(lambda seed: _train_one(params, ws, data, spec, seed), seeds)
    val = {seed: accuracy(model, *ds.part("val")) for seed, (model, _, _) in zip(seeds, results, strict=True)}
    baseline = _random_baseline(params, ws, ds, data, spec) if cfg.random_baseline else None
    with atomic_dir(ws.artifact("train")) as d:
        for seed, (model, _, extra) in zip(seeds, results, strict=True):
            target = d if seed == cfg.seed else d / "seeds" / f"seed-{seed}"
            target.mkdir(parents=True, exist_ok=True)
            save_model(target, model.state_dict(), spec, root=ws.root, stage="train", method=cfg.init.scheme,
                       config=cfg.model_dump(mode="json"), seed=seed, parents=_parents(ws), extra=extra)
        if baseline is not None:
            (d / BASELINE).mkdir()
            save_model(d / BASELINE, baseline.state_dict(), spec, root=ws.root, stage="train", method="random_subset",
                       config=cfg.model_dump(mode="json"), seed=cfg.seed, parents=_parents(ws),
                       extra=_distributed_meta(cfg))
    if baseline is not None:
        val["random_baseline"] = accuracy(baseline, *ds.part("val"))
    metrics = {"train_examples": len(data.y), "training_set": data.kind, "final_train_loss": round(results[0][1][-1], 6),
               "val_accuracy": round(val[cfg.seed], 6)}
    if cfg.seeds:
        metrics["val_accuracy_by_seed"] = {str(s): round(v, 6) for s, v in val.items() if s != "random_baseline"}
    if baseline is not None:
        metrics["val_accuracy_random_baseline"] = round(val["random_baseline"], 6)
    return metrics


BASELINE = "random_baseline"


def random_subset(y_all: torch.Tensor, y_chosen: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Indices into the train split: per class, as many uniformly random examples as the chosen
    set has of that class (a synthetic set's images per class, or a coreset's class counts)."""
    picks = []
    for c in y_chosen.unique():
        pool = (y_all == c).nonzero().flatten()
        want = int((y_chosen == c).sum())
        if want > len(pool):
            raise ParamsError(f"train.random_baseline: the selection has {want} examples of class {int(c)}, "
                              f"the train split only {len(pool)}")
        picks.append(pool[torch.randperm(len(pool), generator=g)[:want]])
    return torch.cat(picks).sort().values


def _random_baseline(params, ws, ds, data: TrainingSet, spec):
    """The model trained on a random real subset shaped like the selection, or None when the
    selection is the random method's (or the whole split, or an epoch plan over it)."""
    select_method = artifacts.read_meta(ws.artifact("select"))["method"]
    x, y = ds.part("train")
    if select_method == "random" or data.kind == "plan" or (data.kind == "subset" and len(data.y) == len(y)):
        return None
    cfg = params.train
    ids = random_subset(y, data.y, torch.Generator().manual_seed(cfg.seed + 7919))
    g = torch.Generator().manual_seed(cfg.seed)  # the main run's init and batch order
    model = build_from_spec(spec)
    masks = initialize(model, cfg.init, g, root=ws.root)
    _fit(cfg, spec, model, x[ids], y[ids], g, masks, label="train random baseline")
    return model
