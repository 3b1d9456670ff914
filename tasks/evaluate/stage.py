"""evaluate stage runner: every artifact of the pipeline measured on one harness.

Rows of metrics/summary.csv: the base, pruned and quantized models on the test split; each
task model on its own task; the base and the merged model on every task and on the mean
over tasks (the comparison task merging is judged by). A weight-matching merge (one model, one
head) is measured on the test split; a merge of outside checkpoints has no row. Each row carries
a bootstrap 95% interval of its accuracy over the test examples.

Beside the table: ``reports/comparisons.csv`` pairs each method with its stage's baseline on
the same examples (``baselines.py``: quantize variants against RTN at the same grid; the model
trained on a selection against one trained on a random subset of the same size and classes, and
the pruned model against a random mask of equal per-layer sparsity, when the train and prune
stages wrote those baselines; the merge against the uniform soup of the same task models); ``reports/per_class.csv`` holds per-class
accuracy; the promotion rule (``promotion.py``) decides whether the run's candidate replaces
the champion in ``runs/champion.json``; the report draws the lineage graph of every artifact
from the meta.json hashes and flags parents that changed since (``lineage.py``).
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta, write_json_atomic
from slimforge.averaging import average_states
from slimforge.checkpoint import load_any, load_model, load_multihead, pruned_2to4
from slimforge.data import load_dataset
from slimforge.transforms import task_data
from tasks.evaluate.baselines import compare, quantize_pairs
from tasks.evaluate.cost import flops_per_example, peak_memory_bytes
from tasks.evaluate.harness import (
    bits_per_parameter,
    classification_metrics,
    count_parameters,
    latency_ms,
    predict,
    size_on_disk,
    sparsity,
)
from tasks.evaluate.lineage import collect_lineage, lineage_mermaid, lineage_svg
from tasks.evaluate.promotion import candidate_row, champion_record, decide
from tasks.evaluate.report import render_report
from tasks.evaluate.schema import validate_comparisons, validate_summary, write_summary
from tasks.evaluate.statistics import accuracy_ci, bootstrap_ci


class Harness:
    """Measures models on the test split and keeps, beside each summary row, the per-example
    correctness the paired comparisons need, keyed by (artifact, evaluated_on)."""

    def __init__(self, cfg, x, y, num_classes: int, accelerator: torch.device | None = None):
        self.cfg, self.x, self.y, self.k = cfg, x, y, num_classes
        self.accelerator = accelerator  # where the gpu_* columns are measured; None: not measured
        self.rows: list[dict] = []
        self.correct: dict[tuple[str, str], np.ndarray] = {}
        self.per_class: list[dict] = []

    def score(self, model, spec=("identity", "identity")) -> tuple[dict, np.ndarray]:
        """Quality only: (classification metrics, per-example correctness) on the task's test data."""
        x, y = task_data(*spec, self.x, self.y)
        logits = predict(model, x)
        return classification_metrics(logits, y, self.k), (logits.argmax(1) == y).numpy()

    def add(self, artifact: str, directory: Path, evaluated_on: str, model, spec=("identity", "identity")) -> dict:
        """Every harness column for one model; size is its weights file on disk."""
        cfg = self.cfg
        m, correct = self.score(model, spec)
        low, high = accuracy_ci(correct, np.random.default_rng(cfg.seed), n_boot=cfg.bootstrap)
        size, n = size_on_disk(directory / WEIGHTS), count_parameters(model)
        shape = tuple(self.x.shape[1:])
        b1, b256 = cfg.latency_batches
        g = torch.Generator().manual_seed(cfg.seed)
        time = lambda b: latency_ms(model, shape, b, cfg.latency_repeats, cfg.latency_warmup, g)
        meta = read_meta(directory)
        row = {"artifact": artifact, "stage": meta["stage"], "method": meta["method"], "evaluated_on": evaluated_on,
               "accuracy": m["accuracy"], "loss": m["loss"], "ece": m["ece"], "size_bytes": size,
               "sparsity": sparsity(model), "bits": bits_per_parameter(size, n), "params": n,
               "latency_ms_b1": time(b1), "latency_ms_b256": time(b256), "accuracy_low": low, "accuracy_high": high,
               "flops": flops_per_example(model, shape),
               "peak_memory_bytes": peak_memory_bytes(model, shape, b256, torch.Generator().manual_seed(cfg.seed)),
               **self.on_accelerator(model, directory)}
        self.rows.append(row)
        self.correct[(artifact, evaluated_on)] = correct
        self.per_class.append({"artifact": artifact, "evaluated_on": evaluated_on,
                               **{f"class_{c}": a for c, a in enumerate(m["per_class_accuracy"])}})
        return row

    def on_accelerator(self, model, directory: Path) -> dict:
        """The gpu_* columns: latency and peak memory of the model on the accelerator. A packed model,
        and a 2:4-pruned one, is loaded again there (its execution modules are chosen per device:
        low-bit kernels, sparse tensor cores); any other is copied."""
        if self.accelerator is None:
            return {}
        cfg, shape = self.cfg, tuple(self.x.shape[1:])
        packed = any(getattr(m, "is_packed", False) for m in model.modules())
        reload = packed or pruned_2to4(read_meta(directory))
        on = load_any(directory, self.accelerator) if reload else copy.deepcopy(model).to(self.accelerator)
        g = lambda: torch.Generator().manual_seed(cfg.seed)
        b1, b256 = cfg.latency_batches
        return {"gpu_latency_ms_b1": latency_ms(on, shape, b1, cfg.latency_repeats, cfg.latency_warmup, g()),
                "gpu_latency_ms_b256": latency_ms(on, shape, b256, cfg.latency_repeats, cfg.latency_warmup, g()),
                "gpu_peak_memory_bytes": peak_memory_bytes(on, shape, b256, g())}

    def add_tasks(self, artifact: str, directory: Path, models: dict, tasks: dict) -> None:
        """One row per task plus the tasks-mean row (latency and size from the first task).
        ``tasks`` maps a task to its (transform, relabel)."""
        rows = [self.add(artifact, directory, task, models[task], spec) for task, spec in tasks.items()]
        correct = np.concatenate([self.correct[(artifact, t)] for t in tasks])  # equal-size tasks
        low, high = accuracy_ci(correct, np.random.default_rng(self.cfg.seed), n_boot=self.cfg.bootstrap)
        mean = {c: sum(r[c] for r in rows) / len(rows) for c in ("accuracy", "loss", "ece")}
        self.rows.append({**rows[0], **mean, "evaluated_on": "tasks-mean", "accuracy_low": low, "accuracy_high": high})
        self.correct[(artifact, "tasks-mean")] = correct

    def score_tasks(self, key: str, models: dict, tasks: dict) -> None:
        """Per-example results of a baseline that has no artifact (no summary row)."""
        for task, spec in tasks.items():
            self.correct[(key, task)] = self.score(models[task], spec)[1]
        self.correct[(key, "tasks-mean")] = np.concatenate([self.correct[(key, t)] for t in tasks])


def run(params, ws, fanout=None) -> dict:
    cfg = params.evaluate
    ds = load_dataset(ws.artifact("ingest"))
    h = Harness(cfg, *ds.part("test"), ds.num_classes, accelerator(cfg.gpu))
    for artifact, directory in [("train", ws.artifact("train")), *_seed_runs(ws), *_baselines(ws, "train"),
                                ("prune", ws.artifact("prune")), *_baselines(ws, "prune"),
                                *[(f"quantize/{p.name}", p) for p in sorted(ws.artifact("quantize").iterdir())]]:
        h.add(artifact, directory, "test", load_any(directory))
    task_dirs = sorted(p for p in ws.artifact("finetune").iterdir() if p.is_dir())
    tasks = {p.name: task_spec(read_meta(p)["task"]) for p in task_dirs}
    for task, spec in tasks.items():
        h.add(f"finetune/{task}", ws.artifact("finetune", task), task, load_any(ws.artifact("finetune", task)), spec)
    base = load_any(ws.artifact("train"))
    h.add_tasks("train", ws.artifact("train"), {t: base for t in tasks}, tasks)
    merged = _merge_rows(h, ws.artifact("merge"))
    summary = validate_summary(pd.DataFrame(h.rows))
    comparisons = compare(_pairs(ws, merged, task_dirs, tasks, h), h.correct, cfg.seed, cfg.bootstrap)
    promotion = promote(summary, cfg.promotion, ws.root / "runs" / "champion.json")
    lineage = collect_lineage(ws.root)
    with atomic_dir(ws.root / "reports") as d:
        render_report(summary, d, comparisons=comparisons, promotion=promotion, seed_stats=seed_statistics(summary),
                      lineage_svg=lineage_svg(lineage), lineage_mermaid=lineage_mermaid(lineage))
        comparisons.to_csv(d / "comparisons.csv", index=False, lineterminator="\n")
        pd.DataFrame(h.per_class).to_csv(d / "per_class.csv", index=False, lineterminator="\n")
    write_summary(summary, ws.root / "metrics" / "summary.csv")
    return {**_headline(summary), "train_seeds": seed_statistics(summary),
            "against_baselines": {f"{r.artifact}@{r.evaluated_on} vs {r.baseline}": round(float(r.difference), 6)
                                  for r in comparisons.itertuples()},
            "promotion": {k: promotion[k] for k in ("promote", "reason")},
            "stale_lineage_edges": len(lineage.stale())}


def accelerator(setting: str) -> torch.device | None:
    """The GPU the gpu_* columns are measured on: the current CUDA device under ``auto``."""
    return torch.device("cuda") if setting == "auto" and torch.cuda.is_available() else None


def _pairs(ws, merged: str | None, task_dirs, tasks: dict, h: Harness) -> list[tuple[str, str, str, str]]:
    """(artifact, evaluated_on, baseline label, baseline key) of every comparison to make."""
    configs = {p.name: read_meta(p)["config"] for p in sorted(ws.artifact("quantize").iterdir())}
    pairs = [(a, "test", f"{b} (RTN)", b) for a, b in quantize_pairs(configs)]
    labels = {"train": "random subset, same size and classes", "prune": "random mask, same per-layer sparsity"}
    pairs += [(stage, "test", f"{artifact} ({labels[stage]})", artifact)
              for stage in labels for artifact, _ in _baselines(ws, stage)]
    if merged is not None and merged != "average":
        models = [load_model(p) for p in task_dirs]
        soup = average_states([dict(m.backbone.state_dict()) for m in models])
        for m in models:
            m.backbone.load_state_dict(soup)
        h.score_tasks("uniform_soup", dict(zip(tasks, models, strict=True)), tasks)
        pairs += [("merge", t, "uniform soup", "uniform_soup") for t in [*tasks, "tasks-mean"]]
    return pairs


def task_spec(task: dict) -> tuple[str, str]:
    """(transform, relabel) of a task entry of meta.json (older entries have no relabel)."""
    return task.get("transform", "identity"), task.get("relabel", "identity")


def _merge_rows(h: Harness, directory: Path) -> str | None:
    """The merged task models on every task (returns the merge method); a weight-matching merge
    (one head) on the test split; a merge of outside checkpoints has no model of ours to run."""
    meta = read_meta(directory)
    if meta.get("format") == "multihead":
        tasks = {t: task_spec(spec) for t, spec in meta["task_specs"].items()}
        h.add_tasks("merge", directory, load_multihead(directory), tasks)
        return meta["method"]
    if meta.get("format") in ("dense", "sparse"):
        h.add("merge", directory, "test", load_any(directory))
    return None


def promote(summary: pd.DataFrame, cfg, champion_path: Path) -> dict:
    """Decide by the promotion rule; a promoted candidate becomes the champion (runs/champion.json,
    outside the DVC outputs: it outlives the run). Returns the decision record."""
    if not cfg.enabled:
        decision = decide({}, None, cfg)
        return {"promote": False, "reason": decision.reason, "checks": {}}
    candidate = candidate_row(summary, cfg)
    champion = json.loads(champion_path.read_text())["candidate"] if champion_path.is_file() else None
    decision = decide(candidate, champion, cfg)
    record = champion_record(candidate, decision, {"timestamp": datetime.now(UTC).isoformat()})
    if decision.promote:
        champion_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(champion_path, record)
    return {"promote": decision.promote, "reason": decision.reason, "checks": decision.checks}


def saved_sections(root: Path, reports: Path) -> dict:
    """The report sections beside the summary table as the last evaluate run left them (the
    comparisons, promotion decision and seed statistics) plus the current lineage graph, so
    ``slimforge report`` renders the same page as the stage."""
    out: dict = {}
    comparisons = reports / "comparisons.csv"
    if comparisons.is_file():
        out["comparisons"] = validate_comparisons(pd.read_csv(comparisons), str(comparisons))
    metrics = root / "metrics" / "evaluate.json"
    if metrics.is_file():
        saved = json.loads(metrics.read_text())
        out["promotion"], out["seed_stats"] = saved.get("promotion"), saved.get("train_seeds")
    if (root / "artifacts").is_dir():
        lineage = collect_lineage(root)
        out["lineage_svg"], out["lineage_mermaid"] = lineage_svg(lineage), lineage_mermaid(lineage)
    return out


def _baselines(ws, stage: str) -> list[tuple[str, Path]]:
    """A stage's random-baseline artifact (<stage>/random_baseline), if it wrote one."""
    directory = ws.artifact(stage, "random_baseline")
    return [(f"{stage}/random_baseline", directory)] if directory.is_dir() else []


def _seed_runs(ws) -> list[tuple[str, Path]]:
    """The extra runs of a train seed sweep (artifacts/train/seeds/seed-<s>), if any."""
    seeds = ws.artifact("train", "seeds")
    return [(f"train/{p.name}", p) for p in sorted(seeds.iterdir())] if seeds.is_dir() else []


def seed_statistics(summary: pd.DataFrame) -> dict:
    """Test accuracy of the train stage over its seeds: mean, std, a 95% t-interval (``ci95``) and
    the percentile-bootstrap interval (``ci95_bootstrap``). The t-interval is the one to quote
    at a handful of seeds: the bootstrap's covers the mean only ~74% of the time at n = 3 and
    ~83% at n = 5 (400 simulated draws of N(0.9, 0.02)), and is nominal only by n ≈ 50."""
    runs = summary[summary.artifact.str.fullmatch(r"train(/seed-\d+)?") & (summary.evaluated_on == "test")]
    acc = runs.accuracy.to_numpy(dtype=float)
    out = {"n": len(acc), "mean": round(float(acc.mean()), 6)}
    if len(acc) > 1:
        std = float(acc.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(acc) - 1)) * std / len(acc) ** 0.5
        low, high = bootstrap_ci(acc, rng=np.random.default_rng(0))
        out.update(std=round(std, 6), ci95=[round(out["mean"] - half, 6), round(out["mean"] + half, 6)],
                   ci95_bootstrap=[round(low, 6), round(high, 6)])
    return out


def _headline(df: pd.DataFrame) -> dict:
    """The numbers people look at first, keyed for `dvc metrics show`."""
    acc = {f"{r.artifact}@{r.evaluated_on}": round(float(r.accuracy), 6) for r in df.itertuples()}
    size = {r.artifact: int(r.size_bytes) for r in df[df.evaluated_on.isin(["test", "tasks-mean"])].itertuples()}
    return {"accuracy": acc, "size_bytes": size}
