"""How each merge method runs on the pipeline's task models: the glue between the method
functions (tensors in, tensors out) and the stage runner (files in, files out).

A ``TaskSet`` holds the base backbone θ₀, the K fine-tuned backbones, their heads and the
validation split; ``score`` puts a candidate backbone under every task's own head and returns
the mean validation accuracy over the tasks, the criterion every grid search and greedy
choice here uses. Each runner returns the merged backbone and a small report for metrics.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from slimforge.models import Classifier
from slimforge.training import accuracy
from slimforge.transforms import apply_relabel, apply_transform
from tasks.merge.adamerging import AdaMergingConfig, adamerging
from tasks.merge.soup import AverageConfig, GreedySoupConfig, average, greedy_soup
from tasks.merge.task_arithmetic import TaskVectorConfig, merge_task_vectors, task_vectors


@dataclass
class TaskSet:
    names: list[str]
    transforms: list[str]
    template: Classifier  # the base model; probes are copies of it
    base: dict[str, Tensor]  # θ₀'s backbone
    finetuned: list[dict[str, Tensor]]  # θ_k's backbones
    heads: list[dict[str, Tensor]]  # task k's head state
    x_val: Tensor
    y_val: Tensor
    relabels: list[str] | None = None  # per task; None: every task keeps the dataset's labels
    _probe: Classifier | None = field(default=None, repr=False)

    @property
    def taus(self) -> list[dict[str, Tensor]]:
        return task_vectors(self.base, self.finetuned)

    def task_inputs(self, k: int) -> Tensor:
        return apply_transform(self.transforms[k], self.x_val)

    def task_labels(self, k: int) -> Tensor:
        return apply_relabel(self.relabels[k], self.y_val) if self.relabels else self.y_val

    def accuracies(self, backbone: dict[str, Tensor]) -> list[float]:
        """Validation accuracy of ``backbone`` under each task's head, on that task's inputs."""
        if self._probe is None:
            self._probe = copy.deepcopy(self.template)
        self._probe.backbone.load_state_dict(backbone)
        out = []
        for k, head in enumerate(self.heads):
            self._probe.head.load_state_dict(head)
            out.append(accuracy(self._probe, self.task_inputs(k), self.task_labels(k)))
        return out

    def score(self, backbone: dict[str, Tensor]) -> float:
        accs = self.accuracies(backbone)
        return sum(accs) / len(accs)


Merged = tuple[dict[str, Tensor], dict]


def run_task_vectors(ts: TaskSet, cfg: TaskVectorConfig) -> Merged:
    """Every (λ, q) of the grids scored on validation; the best wins (ties: the smaller λ)."""
    taus = ts.taus
    rescales = cfg.rescales if cfg.method == "dare" and cfg.rescales else [None]
    curve = {(lam, q): ts.score(merge_task_vectors(ts.base, taus, lam, cfg, q))
             for lam, q in itertools.product(cfg.lambdas, rescales)}
    lam, q = max(curve, key=lambda key: (curve[key], -key[0]))
    report = {"lambda": lam, "val_accuracy": round(curve[(lam, q)], 6),
              "val_accuracy_by_lambda": {str(k[0]) if q is None else f"{k[0]}/q={k[1]}": round(v, 6)
                                         for k, v in curve.items()}}
    if q is not None:
        report["rescale"] = q
    return merge_task_vectors(ts.base, taus, lam, cfg, q), report


def run_average(ts: TaskSet, cfg: AverageConfig) -> Merged:
    merged = average(ts.finetuned)
    return merged, {"val_accuracy": round(ts.score(merged), 6)}


def run_greedy_soup(ts: TaskSet, cfg: GreedySoupConfig) -> Merged:
    merged, chosen = greedy_soup(ts.finetuned, ts.score)
    return merged, {"ingredients": [ts.names[i] for i in chosen], "val_accuracy": round(ts.score(merged), 6)}


def run_adamerging(ts: TaskSet, cfg: AdaMergingConfig) -> Merged:
    """Coefficients learned on the *unlabelled* validation inputs of every task."""
    g = torch.Generator().manual_seed(cfg.seed)
    inputs = [ts.task_inputs(k) for k in range(len(ts.names))]
    labels = [ts.task_labels(k) for k in range(len(ts.names))] if cfg.objective == "cross_entropy" else None
    result = adamerging(ts.template, ts.base, ts.taus, ts.heads, inputs, cfg, g, labels=labels)
    history = result.entropy_history
    return result.backbone, {"coefficients": [round(float(c), 6) for c in result.coefficients.flatten()],
                             "objective_first": round(history[0], 6) if history else None,
                             "objective_last": round(history[-1], 6) if history else None,
                             "val_accuracy": round(ts.score(result.backbone), 6)}


RUNNERS = {"task_arithmetic": run_task_vectors, "ties": run_task_vectors, "dare": run_task_vectors,
           "average": run_average, "greedy_soup": run_greedy_soup, "adamerging": run_adamerging}
