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
   from the base, so those stay at the base's values; with QKR (below) the in-projections'
   q and k rows train too and the export's in-projections are returned in ``QatLayers.tensors``.
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

ofq only, ``qkr`` (default on), query–key reparameterization (QKR, OFQ section 5.3), as its
reference ``QAttention_qkreparam`` / ``QAttention_qkreparam_4_cga`` implement it
(github.com/nbasyl/OFQ, ``src/quantization/modules/attention.py``, with ``StatsQuantizer`` and
``StatsQuantizer_specific_4_qkreparam_cga`` of ``src/quantization/quantizer/statsq.py``): the
qkv Linear is split into q, k (no bias) and v Linears; per head h the product
W_qk^h = W_q^hᵀ W_k^h (C×C, from the (hd, C) rows of head h) is formed, the heads stacked into
one (H·C, C) matrix, quantized by StatsQ per row, and the logits are x Ŵ_qk^h xᵀ·hd^−½; W_q and
W_k are the latent parameters and train through the product, so the quantized query and key
no longer oscillate against each other (the paper's "intertwined oscillation"). During CGA the
product's confident entries pass no gradient (nothing is restored: they are a function of W_q
and W_k). Here every nn.MultiheadAttention / SlimAttention of the working copy becomes a
``QkrAttention`` (``qat_quantizers.py``) with that forward; Ŵ_qk is on the variant's grid (per
row for ``channel``, as the reference; StatsQ's integer levels, see ``qat_quantizers.py``) and
its codes feed their own oscillation tracker (``qk_oscillating_share``; ``oscillating_share``
stays that of the exported layers, comparable across quantizers). What differs from the
reference, and why:

- weight-only, as all of QAT here: the reference also LSQ-quantizes the attention input, the
  product x·Ŵ_qk, v and the softmax, and StatsQ-quantizes W_v. The packed format stores no
  activation quantization nor any in-projection (it is not a Linear), so W_v stays the base's
  and no activation is quantized, exactly as for ``ste``/``lsq``.
- the reference drops the q and k biases; we keep the one term of them that survives the
  softmax over keys, x_m·(W_k^hᵀ b_q^h), in float, so QKR in float is the original attention.
- the export cannot hold Ŵ_qk: a (H·C, C) product matrix is no layer of our models, and a
  full-rank Ŵ_qk^h does not factor into (hd, C) W_q^h, W_k^h. ``QatLayers.tensors`` carries,
  for the stage to store over the base's (float, as every in-projection), each attention's
  ``in_proj_weight`` / ``in_proj_bias`` with W_q^hᵀW_k^h = the rank-hd truncated SVD of Ŵ_qk^h
  (the nearest product of two (hd, C) matrices, Eckart–Young; ``QkrAttention.export_in_proj``),
  b_q refitted to keep the bias term, W_v and the other biases the base's. The latent float
  W_qᵀW_k would be the other choice, but the network has adapted to the quantized logits:
  on the tiny ViT (2 bits, MNIST-5k) exporting it lost about 2 points that the truncation keeps.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kernels.dispatch import Kernel
from slimforge.models import ATTENTION
from slimforge.training import FitConfig, fit
from tasks.quantize.layerwise import QuantizedLayer, fits, quantizable
from tasks.quantize.qat_quantizers import (
    QUANTIZERS,
    OscillationTracker,
    QkrAttention,
    WeightQuantizer,
    confident,
)
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
    qkr: bool = Field(
        default=True, description="ofq: query–key reparameterization of every attention (quantize W_qᵀW_k per "
                                  "head instead of W_q and W_k); no effect on models without attention. "
                                  "Only ofq takes it: left out, other quantizers get false")
    seed: int = Field(default=0, description="seed of the QAT data order")

    @model_validator(mode="after")
    def _symmetric(self) -> QatConfig:
        if not self.symmetric:
            raise ValueError(f"quantize.variants: {self.name!r}: method qat needs symmetric: true (zero-point 0)")
        if self.qkr and self.quantizer != "ofq":
            if "qkr" in self.model_fields_set:
                raise ValueError(f"quantize.variants: {self.name!r}: qkr: true needs quantizer: ofq "
                                 f"(got {self.quantizer!r}); QKR is part of OFQ")
            self.qkr = False  # the default is ofq's; ste/lsq variants record qkr: false
        return self


class QatLayers(dict):
    """{layer name: QuantizedLayer}, plus ``report``: one dict of training figures per epoch, and
    ``tensors``: float tensors QAT trained besides the quantized layers ({state-dict key: tensor},
    QKR's in-projections), to store in place of the base's."""

    def __init__(self, layers: dict[str, QuantizedLayer], report: list[dict], tensors: dict[str, Tensor] | None = None):
        super().__init__(layers)
        self.report = report
        self.tensors = tensors or {}


def prepare(model: nn.Module, cfg: QatConfig, kernel: Kernel = "auto") -> dict[str, WeightQuantizer]:
    """Parametrize every quantizable layer's weight of ``model`` (in place) with cfg's quantizer,
    fake-quantizing on ``kernel``."""
    quantizers = {}
    for name, module in quantizable(model, cfg).items():
        quantizers[name] = QUANTIZERS[cfg.quantizer](module.weight, cfg, kernel)
        parametrize.register_parametrization(module, "weight", quantizers[name])
    return quantizers


def prepare_qkr(model: nn.Module, cfg: QatConfig, kernel: Kernel = "auto") -> dict[str, QkrAttention]:
    """Replace every attention of ``model`` (in place) with its ``QkrAttention``, by module name.
    An attention whose width does not fit cfg's grid (group size) stays as it is."""
    out = {}
    for name, module in list(model.named_modules()):
        if name and isinstance(module, ATTENTION) and fits(module.in_proj_weight.shape[1], cfg):
            parent, _, child = name.rpartition(".")
            out[name] = QkrAttention(module, cfg, kernel)
            setattr(model.get_submodule(parent), child, out[name])
    return out


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

    def __init__(self, quantizers: dict[str, WeightQuantizer], latent: dict[str, nn.Parameter], momentum: float,
                 qkr: dict[str, QkrAttention] | None = None):
        # what is tracked: (quantizer, current pre-quantization weight) per layer, and per QKR product
        self.sources = {name: (q, lambda p=latent[name]: p) for name, q in quantizers.items()}
        self.qk_sources = {name: (a.quantizer, a.product) for name, a in (qkr or {}).items()}
        self.trackers = {name: OscillationTracker(q.codes(w()), momentum) for name, (q, w) in self.sources.items()}
        self.qk_trackers = {name: OscillationTracker(q.codes(w()), momentum) for name, (q, w) in self.qk_sources.items()}
        self.annealing: Annealing | None = None
        self.report: list[dict] = []
        self.steps = 0

    def __call__(self, _model: nn.Module) -> None:
        if self.annealing is not None:
            self.annealing.after_step()
        for trackers, sources in ((self.trackers, self.sources), (self.qk_trackers, self.qk_sources)):
            for name, tracker in trackers.items():
                quantizer, weight = sources[name]
                tracker.update(quantizer.codes(weight()))
        self.steps += 1

    @staticmethod
    def _share(trackers: dict[str, OscillationTracker]) -> float:
        hits, total = zip(*(t.close_window() for t in trackers.values()), strict=True)
        return round(sum(hits) / sum(total), 6)

    def close_epoch(self, phase: str, loss: float) -> None:
        frequency = (sum(float(t.frequency.sum()) for t in self.trackers.values())
                     / sum(t.frequency.numel() for t in self.trackers.values()))
        row = {"phase": phase, "epoch": len(self.report), "loss": round(loss, 6),
               "oscillating_share": self._share(self.trackers), "mean_oscillation_frequency": round(frequency, 8)}
        if self.qk_trackers:  # QKR's products, not exported: apart from the exported layers' share
            row["qk_oscillating_share"] = self._share(self.qk_trackers)
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


def quantize_qat(model: nn.Module, data: tuple[Tensor, Tensor], cfg: QatConfig, kernel: Kernel = "auto") -> QatLayers:
    """QAT of ``model`` on ``data`` = (x, y), the labelled train split; ``model`` is not modified.
    ``kernel`` picks the fake-quant op's implementation (``kernels.fake_quant``)."""
    if not isinstance(data, tuple) or len(data) != 2:
        raise ValueError(f"quantize.variants: {cfg.name!r} (method qat) needs the labelled train split (x, y)")
    x, y = data
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(False)
    quantizers = prepare(work, cfg, kernel)
    qkr = prepare_qkr(work, cfg, kernel) if cfg.qkr else {}
    latent = latent_weights(work, quantizers)
    for p in latent.values():
        p.requires_grad_(True)
    params = [*latent.values(), *(p for q in quantizers.values() for p in q.parameters()),
              *(a.query_key for a in qkr.values())]
    g = torch.Generator().manual_seed(cfg.seed)
    monitor = Monitor(quantizers, latent, cfg.oscillation_momentum, qkr)
    _train(work, x, y, cfg.training, g, params, monitor, "qat")
    if cfg.quantizer == "ofq" and cfg.cga_epochs > 0:
        monitor.annealing = Annealing(quantizers, latent, cfg.boundary_range)
        for attention in qkr.values():
            attention.boundary_range = cfg.boundary_range
        cga = cfg.training.model_copy(update={"epochs": cfg.cga_epochs, "schedule": "linear_decay", "warmup_steps": 0})
        _train(work, x, y, cga, g, params, monitor, "cga")
        monitor.annealing.remove()
    tensors = {}
    for name, attention in qkr.items():
        weight, bias = attention.export_in_proj()
        tensors |= {f"{name}.in_proj_weight": weight.contiguous(), f"{name}.in_proj_bias": bias.contiguous()}
    return QatLayers(convert(work, quantizers), monitor.report, tensors)
