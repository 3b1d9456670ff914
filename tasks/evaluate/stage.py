"""evaluate stage runner: every artifact of the pipeline measured on one harness.

Rows of metrics/summary.csv: the base, pruned and quantized models on the test split; each
task model on its own task; the base and the merged model on every task and on the mean
over tasks (the comparison task merging is judged by). A weight-matching merge (one model, one
head) is measured on the test split; a merge of outside checkpoints has no row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from scipy import stats

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta
from slimforge.checkpoint import load_any, load_multihead
from slimforge.data import load_dataset
from slimforge.transforms import task_data
from tasks.evaluate.harness import (
    bits_per_parameter,
    classification_metrics,
    count_parameters,
    latency_ms,
    predict,
    size_on_disk,
    sparsity,
)
from tasks.evaluate.report import render_report
from tasks.evaluate.schema import validate_summary, write_summary


def _measure(model, x, y, num_classes, weights: Path, cfg) -> dict:
    """Every harness column for one model on (x, y); size is the weights file on disk."""
    m = classification_metrics(predict(model, x), y, num_classes)
    size, n = size_on_disk(weights), count_parameters(model)
    b1, b256 = cfg.latency_batches
    g = torch.Generator().manual_seed(cfg.seed)
    time = lambda b: latency_ms(model, tuple(x.shape[1:]), b, cfg.latency_repeats, cfg.latency_warmup, g)
    return {"accuracy": m["accuracy"], "loss": m["loss"], "ece": m["ece"], "size_bytes": size,
            "sparsity": sparsity(model), "bits": bits_per_parameter(size, n), "params": n,
            "latency_ms_b1": time(b1), "latency_ms_b256": time(b256)}


def _row(artifact: str, directory: Path, evaluated_on: str, measured: dict) -> dict:
    meta = read_meta(directory)
    return {"artifact": artifact, "stage": meta["stage"], "method": meta["method"],
            "evaluated_on": evaluated_on, **measured}


def _on_tasks(artifact: str, directory: Path, models: dict, tasks: dict, x, y, k, cfg) -> list[dict]:
    """One row per task plus the tasks-mean row (latency and size from the first task).
    ``tasks`` maps a task to its (transform, relabel)."""
    rows = [_row(artifact, directory, task, _measure(models[task], *task_data(*spec, x, y), k,
                                                       directory / WEIGHTS, cfg))
            for task, spec in tasks.items()]
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in ("accuracy", "loss", "ece")}
    rows.append({**rows[0], **mean, "evaluated_on": "tasks-mean"})
    return rows


def run(params, ws, fanout=None) -> dict:
    cfg = params.evaluate
    ds = load_dataset(ws.artifact("ingest"))
    x, y = ds.part("test")
    k = ds.num_classes
    rows = []
    for artifact, directory in [("train", ws.artifact("train")), *_seed_runs(ws), ("prune", ws.artifact("prune")),
                                *[(f"quantize/{p.name}", p) for p in sorted(ws.artifact("quantize").iterdir())]]:
        rows.append(_row(artifact, directory, "test", _measure(load_any(directory), x, y, k, directory / WEIGHTS, cfg)))
    task_dirs = sorted(p for p in ws.artifact("finetune").iterdir() if p.is_dir())
    tasks = {p.name: task_spec(read_meta(p)["task"]) for p in task_dirs}
    for task, spec in tasks.items():
        d = ws.artifact("finetune", task)
        rows.append(_row(f"finetune/{task}", d, task, _measure(load_any(d), *task_data(*spec, x, y), k,
                                                                d / WEIGHTS, cfg)))
    base = load_any(ws.artifact("train"))
    rows += _on_tasks("train", ws.artifact("train"), {t: base for t in tasks}, tasks, x, y, k, cfg)
    rows += _merge_rows(ws.artifact("merge"), x, y, k, cfg)
    summary = validate_summary(pd.DataFrame(rows))
    with atomic_dir(ws.root / "reports") as d:
        render_report(summary, d)
    write_summary(summary, ws.root / "metrics" / "summary.csv")
    return {**_headline(summary), "train_seeds": seed_statistics(summary)}


def task_spec(task: dict) -> tuple[str, str]:
    """(transform, relabel) of a task entry of meta.json (older entries have no relabel)."""
    return task.get("transform", "identity"), task.get("relabel", "identity")


def _merge_rows(directory: Path, x, y, k, cfg) -> list[dict]:
    """The merged task models on every task; a weight-matching merge (one head) on the test split;
    a merge of outside checkpoints has no model of ours to run and gets no row."""
    meta = read_meta(directory)
    if meta.get("format") == "multihead":
        tasks = {t: task_spec(spec) for t, spec in meta["task_specs"].items()}
        return _on_tasks("merge", directory, load_multihead(directory), tasks, x, y, k, cfg)
    if meta.get("format") in ("dense", "sparse"):
        return [_row("merge", directory, "test", _measure(load_any(directory), x, y, k, directory / WEIGHTS, cfg))]
    return []


def _seed_runs(ws) -> list[tuple[str, Path]]:
    """The extra runs of a train seed sweep (artifacts/train/seeds/seed-<s>), if any."""
    seeds = ws.artifact("train", "seeds")
    return [(f"train/{p.name}", p) for p in sorted(seeds.iterdir())] if seeds.is_dir() else []


def seed_statistics(summary: pd.DataFrame) -> dict:
    """Test accuracy of the train stage over its seeds: mean, std and a 95% t-interval."""
    runs = summary[(summary.stage == "train") & (summary.evaluated_on == "test")]
    acc = runs.accuracy.to_numpy(dtype=float)
    out = {"n": len(acc), "mean": round(float(acc.mean()), 6)}
    if len(acc) > 1:
        std = float(acc.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(acc) - 1)) * std / len(acc) ** 0.5
        out.update(std=round(std, 6), ci95=[round(out["mean"] - half, 6), round(out["mean"] + half, 6)])
    return out


def _headline(df: pd.DataFrame) -> dict:
    """The numbers people look at first, keyed for `dvc metrics show`."""
    acc = {f"{r.artifact}@{r.evaluated_on}": round(float(r.accuracy), 6) for r in df.itertuples()}
    size = {r.artifact: int(r.size_bytes) for r in df[df.evaluated_on.isin(["test", "tasks-mean"])].itertuples()}
    return {"accuracy": acc, "size_bytes": size}
