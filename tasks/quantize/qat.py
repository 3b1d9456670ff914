"""QAT: fine-tune the trained base with fake-quantized weights, then export the codes (METHODS.md §5).

``quantize.variants[*].quantizer`` picks the weight quantizer (``qat_quantizers.py`` cites the
papers): ``ste`` (Jacob et al., CVPR 2018), ``lsq`` (Esser et al., "Learned Step Size
Quantization", ICLR 2020) or ``ofq`` (Liu et al., "Oscillation-free Quantization for Low-bit
Vision Transformers", ICML 2023). As torchao's ``QATConfig`` does, QAT is the PTQ grid config
plus a prepare and a convert step:

1. prepare: in a copy of the base, each quantizable Linear/Conv2d weight (the layers RTN
   quantizes) gets its quantizer as a ``torch.nn.utils.parametrize`` parametrization, so the
   forward sees ŵ and ``slimforge.training.fit`` trains the latent weights on the labelled
   train split. Only the latent quantized weights (and LSQ's steps) train: the export stores
   the quantized layers, every other tensor (biases, norms, attention in-projections) comes
   from the base, so those stay at the base's values.
2. ofq only, confidence-guided annealing (CGA, OFQ section 5.2, as its reference ``cga.py``
   runs it): ``cga_epochs`` further epochs, the lr decaying linearly from ``training.lr`` to 0,
   in which weights farther than ``boundary_range`` steps from a rounding threshold are frozen:
   their gradients are zeroed and, after every optimizer step, their values restored; the set
   is recomputed from the weights after every step.
3. convert: each layer's codes on its final grid (the learned LSQ step, StatsQ's statistical
   step or STE's max-based one as the scale, zero-point 0), exactly what the fake-quant
   forward computed, as the {layer: QuantizedLayer} every PTQ method returns.

After every optimizer step the integer codes feed an oscillation tracker; each epoch reports
the share of quantized weights that oscillated (code changed opposite to its previous change)
at least once in it, the mean EMA oscillation frequency, the mean loss and, in CGA, the frozen
share (``QatLayers.report``).

Not implemented: OFQ's query–key reparameterization (QKR, section 5.3), which quantizes the
per-head product W_qᵀW_k (C×C per head) instead of W_q and W_k. It changes the architecture
(an H·C×C weight and no q/k biases) and neither our models nor the packed format have such a
layer; nn.MultiheadAttention's in-projection is not quantized by any method here. ``ofq`` is
StatsQ + CGA.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from slimforge.training import FitConfig, fit
from tasks.quantize.layerwise import QuantizedLayer, quantizable
from tasks.quantize.qat_quantizers import QUANTIZERS, OscillationTracker, WeightQuantizer, confident
from tasks.quantize.rtn import GridConfig


class QatConfig(GridConfig):
    """One QAT variant: the grid, the weight quantizer and the fine-tuning run."""

    method: Literal["qat"] = "qat"
    quantizer: Literal["ste", "lsq", "ofq"] = Field(
        default="lsq", description="weight quantizer: ste (max-based step), lsq (learned step) or ofq "
                                   "(statistical step + confidence-guided annealing)")
    training: FitConfig = Field(
        default_factory=lambda: FitConfig(epochs=5, lr=1e-3, weight_decay=0.0),
        description="QAT fine-tuning of the trained base: epochs, optimizer, peak lr per step, schedule")
    cga_epochs: int = Field(default=2, ge=0, description="ofq: epochs of confidence-guided annealing after QAT")
    boundary_range: float = Field(
        default=0.005, gt=0, lt=0.5,
        description="ofq: distance from a rounding threshold, in quantization steps, within which a weight "
                    "keeps training during CGA; all others are frozen")
    oscillation_momentum: float = Field(
        default=0.01, gt=0, le=1, description="EMA momentum per optimizer step of each weight's oscillation frequency")
    seed: int = Field(default=0, description="seed of the QAT data order")

    @model_validator(mode="after")
    def _symmetric(self) -> QatConfig:
        if not self.symmetric:
            raise ValueError(f"quantize.variants: {self.name!r}: method qat needs symmetric: true (zero-point 0)")
        return self


class QatLayers(dict):
    """{layer name: QuantizedLayer}, plus ``report``: one dict of training figures per epoch."""

    def __init__(self, layers: dict[str, QuantizedLayer], report: list[dict]):
        super().__init__(layers)
        self.report = report


def prepare(model: nn.Module, cfg: QatConfig) -> dict[str, WeightQuantizer]:
    """Parametrize every quantizable layer's weight of ``model`` (in place) with cfg's quantizer."""
    quantizers = {}
    for name, module in quantizable(model, cfg).items():
        quantizers[name] = QUANTIZERS[cfg.quantizer](module.weight, cfg)
        parametrize.register_parametrization(module, "weight", quantizers[name])
    return quantizers


def latent_weights(model: nn.Module, quantizers: dict[str, WeightQuantizer]) -> dict[str, nn.Parameter]:
    """The trainable latent weight behind each parametrized layer."""
    return {name: model.get_submodule(name).parametrizations.weight.original for name in quantizers}


def convert(model: nn.Module, quantizers: dict[str, WeightQuantizer]) -> dict[str, QuantizedLayer]:
    """Each parametrized layer's codes and steps, reproducing its fake-quant weight."""
    latent = latent_weights(model, quantizers)
    return {name: QuantizedLayer(q.export(latent[name])) for name, q in quantizers.items()}


class Annealing:
    """CGA's freezing around ``fit``'s optimizer steps (see the module docstring)."""

    def __init__(self, quantizers: dict[str, WeightQuantizer], latent: dict[str, nn.Parameter], boundary_range: float):
        self.quantizers, self.latent, self.boundary_range = quantizers, latent, boundary_range
        self.frozen: dict[str, Tensor] = {}
        self.saved: dict[str, Tensor] = {}
        self.refresh()
        self.hooks = [p.register_hook(lambda g, n=name: g.masked_fill(self.frozen[n], 0.0))
                      for name, p in latent.items()]

    def refresh(self) -> None:
        for name, p in self.latent.items():
            self.frozen[name] = confident(self.quantizers[name], p, self.boundary_range)
            self.saved[name] = p.detach().clone()

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.latent.items():
            p.copy_(torch.where(self.frozen[name], self.saved[name], p))
        self.refresh()

    def frozen_share(self) -> float:
        return sum(int(m.sum()) for m in self.frozen.values()) / sum(m.numel() for m in self.frozen.values())

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class Monitor:
    """``fit``'s after_step: CGA's restore (if any), then oscillation tracking and per-epoch figures."""

    def __init__(self, quantizers: dict[str, WeightQuantizer], latent: dict[str, nn.Parameter], momentum: float):
        self.quantizers, self.latent = quantizers, latent
        self.trackers = {name: OscillationTracker(q.codes(latent[name]), momentum) for name, q in quantizers.items()}
        self.annealing: Annealing | None = None
        self.report: list[dict] = []
        self.steps = 0

    def __call__(self, _model: nn.Module) -> None:
        if self.annealing is not None:
            self.annealing.after_step()
        for name, tracker in self.trackers.items():
            tracker.update(self.quantizers[name].codes(self.latent[name]))
        self.steps += 1

    def close_epoch(self, phase: str, loss: float) -> None:
        hits, total = zip(*(t.close_window() for t in self.trackers.values()), strict=True)
        frequency = sum(float(t.frequency.sum()) for t in self.trackers.values()) / sum(total)
        row = {"phase": phase, "epoch": len(self.report), "loss": round(loss, 6),
               "oscillating_share": round(sum(hits) / sum(total), 6), "mean_oscillation_frequency": round(frequency, 8)}
        if self.annealing is not None:
            row["frozen_share"] = round(self.annealing.frozen_share(), 6)
        self.report.append(row)


def _train(work: nn.Module, x: Tensor, y: Tensor, fit_cfg: FitConfig, g: torch.Generator,
           params: list[nn.Parameter], monitor: Monitor, phase: str) -> None:
    """One fit over (x, y), closing the monitor's window at every epoch's end."""
    steps_per_epoch = math.ceil(len(x) / fit_cfg.batch_size)

    def after_step(model: nn.Module) -> None:
        monitor(model)
        if monitor.steps % steps_per_epoch == 0:
            monitor.close_epoch(phase, float("nan"))  # the loss is known once fit returns

    history = fit(work, x, y, fit_cfg, g, params=params, after_step=after_step, label=f"qat {phase}")
    for row, loss in zip(monitor.report[-len(history):], history, strict=True):
        row["loss"] = round(loss, 6)


def quantize_qat(model: nn.Module, data: tuple[Tensor, Tensor], cfg: QatConfig) -> QatLayers:
    """QAT of ``model`` on ``data`` = (x, y), the labelled train split; ``model`` is not modified."""
    if not isinstance(data, tuple) or len(data) != 2:
        raise ValueError(f"quantize.variants: {cfg.name!r} (method qat) needs the labelled train split (x, y)")
    x, y = data
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(False)
    quantizers = prepare(work, cfg)
    latent = latent_weights(work, quantizers)
    for p in latent.values():
        p.requires_grad_(True)
    params = [*latent.values(), *(p for q in quantizers.values() for p in q.parameters())]
    g = torch.Generator().manual_seed(cfg.seed)
    monitor = Monitor(quantizers, latent, cfg.oscillation_momentum)
    _train(work, x, y, cfg.training, g, params, monitor, "qat")
    if cfg.quantizer == "ofq" and cfg.cga_epochs > 0:
        monitor.annealing = Annealing(quantizers, latent, cfg.boundary_range)
        cga = cfg.training.model_copy(update={"epochs": cfg.cga_epochs, "schedule": "linear_decay", "warmup_steps": 0})
        _train(work, x, y, cga, g, params, monitor, "cga")
        monitor.annealing.remove()
    return QatLayers(convert(work, quantizers), monitor.report)
