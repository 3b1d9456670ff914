"""prune stage runner: the chosen method on the trained base, recovery, a sparse-stored artifact.

A masked result is written in the sparse format (bitmask + kept values), so the file shrinks
with sparsity; a structured result is a smaller dense model whose config replaces the base's
in the artifact's model spec; a low-rank result records its ranks in that spec.
"""

from __future__ import annotations

import torch

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta
from slimforge.checkpoint import build_from_spec, load_model, save_model, spec_config
from slimforge.data import load_dataset
from slimforge.training import MaskHold, accuracy, fit
from tasks.prune import METHODS
from tasks.prune.common import (
    LORA_ALPHA,
    LORA_RANK,
    PruneContext,
    Pruned,
    perp_parameters,
    sparsity_report,
)
from tasks.prune.magnitude import apply_masks
from tasks.prune.perp import recover_perp_lora
from tasks.prune.random import random_like
from tasks.select.output import named_set
from tasks.train.init import initialize


def run(params, ws, fanout=None) -> dict:
    cfg = params.prune
    ds = load_dataset(ws.artifact("ingest"))
    spec = read_meta(ws.artifact("train"))["model"]
    model = load_model(ws.artifact("train"))
    val = ds.part("val")
    dense_val = accuracy(model, *val)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = ds.part("train")
    ctx = PruneContext(model, spec_config(spec), tuple(spec["input_shape"]), spec["num_classes"], x, y, g,
                       initial_model=lambda: _initial_model(params, spec, ws), val=val)
    result = METHODS[cfg.method].prune(ctx, cfg)
    val_before = accuracy(result.model, *val)
    rx, ry = named_set(cfg.recovery_data, ws.artifact("select"), ds, g)
    recover(result, cfg, rx, ry, g)
    spec = result_spec(spec, result)
    masked = result.masks and result.model_config is None and not result.ranks  # same architecture as the base
    baseline = random_baseline(ws, cfg, result, rx, ry) if cfg.random_baseline and masked else None
    with atomic_dir(ws.artifact("prune")) as d:
        save_model(d, result.model.state_dict(), spec, root=ws.root, stage="prune", method=cfg.method,
                   config=cfg.model_dump(mode="json"), seed=cfg.seed, parents=_parents(ws, cfg),
                   format="sparse" if result.masks else "dense")
        stored = (d / WEIGHTS).stat().st_size
        if baseline is not None:
            (d / BASELINE).mkdir()
            save_model(d / BASELINE, baseline.model.state_dict(), spec, root=ws.root, stage="prune",
                       method="random_like", config=cfg.model_dump(mode="json"), seed=cfg.seed + 1,
                       parents=_parents(ws, cfg), format="sparse")
    extra = {} if baseline is None else {"val_accuracy_random_baseline": round(accuracy(baseline.model, *val), 6)}
    return {"method": cfg.method, **extra, **sparsity_report(result.model, result.masks), **result.report,
            "bytes": stored, "dense_bytes": (ws.artifact("train") / WEIGHTS).stat().st_size,
            "recovery_examples": 0 if cfg.recovery_params == "none" else len(ry),
            "val_accuracy_dense": round(dense_val, 6), "val_accuracy_before_recovery": round(val_before, 6),
            "val_accuracy": round(accuracy(result.model, *val), 6)}


BASELINE = "random_baseline"


def random_baseline(ws, cfg, result: Pruned, x, y) -> Pruned:
    """Rethinking the Value of Network Pruning's control: the base with a random mask of the same
    per-layer kept counts, recovered exactly as the method's result was (own generator)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model = load_model(ws.artifact("train"))
    masks = random_like(result.masks, g)
    apply_masks(model, masks)
    baseline = Pruned(model, masks)
    recover(baseline, cfg, x, y, g)
    return baseline


def recover(result: Pruned, cfg, x, y, g: torch.Generator) -> None:
    """Fine-tune after pruning: every parameter with the mask held, PERP's biases/norms, or
    those plus masked LoRA adapters merged back into the weights."""
    if cfg.recovery_params == "none":
        return
    if cfg.recovery_params == "perp_lora":
        rank, alpha = cfg.recovery_lora_rank or LORA_RANK, cfg.recovery_lora_alpha or LORA_ALPHA
        recover_perp_lora(result.model, result.masks, x, y, cfg.recovery, rank, alpha, g)
        return
    if cfg.recovery_params == "perp":
        params = perp_parameters(result.model)
    elif result.trainable is not None:
        named = dict(result.model.named_parameters())
        params = [named[n] for n in result.trainable]
    else:
        params = None
    masks = result.masks
    fit(result.model, x, y, cfg.recovery, g, params=params,
        hold=MaskHold(result.model, masks) if masks else None, label=f"prune recovery ({cfg.recovery_params})")


def result_spec(spec: dict, result: Pruned) -> dict:
    spec = dict(spec)
    if result.model_config is not None:
        spec["config"] = result.model_config.model_dump(mode="json")
    if result.ranks:
        spec["low_rank"] = dict(sorted(result.ranks.items()))
    return spec


def _initial_model(params, spec: dict, ws) -> tuple[torch.nn.Module, torch.Generator]:
    """The base at its initialisation, redrawn exactly as the train stage drew it (same seed),
    and that generator after the draw, as the train stage went on to use it."""
    g = torch.Generator().manual_seed(params.train.seed)
    model = build_from_spec(spec)
    initialize(model, params.train.init, g, root=ws.root)
    return model, g


def _parents(ws, cfg) -> dict:
    parents = {"base": ws.artifact("train"), "dataset": ws.artifact("ingest")}
    if cfg.recovery_data.source == "selection":
        parents["recovery_data"] = ws.artifact("select")
    return parents
