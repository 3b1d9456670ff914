"""Loss and accuracy barriers along the linear path between two models (linear mode connectivity).

Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"
(ICML 2020), and Entezari, Sedghi, Saukh & Neyshabur, "The Role of Permutation Invariance in
Linear Mode Connectivity of Neural Networks" (ICLR 2022), Def. 1: with θ(α) = (1 − α)·θ_A + α·θ_B,

    B_loss = max_α  L(θ(α)) − [(1 − α)·L(θ_A) + α·L(θ_B)]

i.e. how far the loss along the path rises above the straight line between the endpoint losses.
The accuracy barrier is the same with the sign turned: how far accuracy drops below its line.
Git Re-Basin (Ainsworth et al., ICLR 2023) reports both before and after permutation alignment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from tasks.merge.weight_matching import weighted_average

Curve = list[dict[str, float]]  # [{"alpha", "loss", "accuracy"}], one point per α
Evaluate = Callable[[dict[str, Tensor]], tuple[float, float]]  # state -> (loss, accuracy)


def interpolation_curve(state_a: dict[str, Tensor], state_b: dict[str, Tensor], evaluate: Evaluate,
                        alphas: Iterable[float]) -> Curve:
    """Loss and accuracy of θ(α) = (1 − α)·θ_A + α·θ_B at each α (float tensors; others from A)."""
    curve = []
    for alpha in alphas:
        loss, acc = evaluate(weighted_average([state_a, state_b], [1 - alpha, alpha]))
        curve.append({"alpha": float(alpha), "loss": float(loss), "accuracy": float(acc)})
    return curve


def _rise_above_line(curve: Curve, key: str, sign: float) -> float:
    """max_α sign·(value(α) − [(1 − α)·value(0) + α·value(1)]); needs points at α = 0 and 1."""
    ends = {p["alpha"]: p[key] for p in curve if p["alpha"] in (0.0, 1.0)}
    if len(ends) != 2:
        raise ValueError(f"barrier: the curve needs points at alpha 0 and 1, it has alphas "
                         f"{[p['alpha'] for p in curve]}")
    return max(sign * (p[key] - ((1 - p["alpha"]) * ends[0.0] + p["alpha"] * ends[1.0])) for p in curve)


def loss_barrier(curve: Curve) -> float:
    """Largest rise of the loss above the line between the endpoint losses (≥ 0)."""
    return _rise_above_line(curve, "loss", 1.0)


def accuracy_barrier(curve: Curve) -> float:
    """Largest drop of the accuracy below the line between the endpoint accuracies (≥ 0)."""
    return _rise_above_line(curve, "accuracy", -1.0)


def classifier_evaluator(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> Evaluate:
    """evaluate(state) -> (mean cross-entropy, accuracy) of ``model`` with ``state`` loaded, on (x, y).
    The model is loaded in place each call; its own weights are not restored."""

    @torch.inference_mode()
    def evaluate(state: dict[str, Tensor]) -> tuple[float, float]:
        model.load_state_dict(state)
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i: i + batch_size])  # (B, classes)
            loss += F.cross_entropy(logits, y[i: i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[i: i + batch_size]).sum().item()
        return loss / len(x), correct / len(x)

    return evaluate


def plot_barrier(curves: dict[str, Curve], path: Path) -> None:
    """Loss and accuracy against α, one line per labelled curve (e.g. naive / aligned), to ``path``."""
    fig = Figure(figsize=(11, 4))  # no pyplot: the global backend and figure registry stay untouched
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, curve in curves.items():
        alphas = [p["alpha"] for p in curve]
        ax_loss.plot(alphas, [p["loss"] for p in curve], marker="o", ms=3,
                     label=f"{label} (barrier {loss_barrier(curve):.3f})")
        ax_acc.plot(alphas, [100 * p["accuracy"] for p in curve], marker="o", ms=3,
                    label=f"{label} (barrier {100 * accuracy_barrier(curve):.1f} pts)")
    for ax, ylabel in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("α  (θ = (1 − α)·θ_A + α·θ_B)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_title("loss along the linear path")
    ax_acc.set_title("accuracy along the linear path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
