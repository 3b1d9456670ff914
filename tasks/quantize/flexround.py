"""FlexRound: learnable rounding by element-wise division, fitted by output reconstruction.

Lee, Kim, Kwon, Lee, "FlexRound: Learnable Rounding based on Element-wise Division for
Post-Training Quantization", ICML 2023 (METHODS.md §5 ``flexround``). A weight W (N, K) is
quantized as

    Ŵ = s₁ · ⌊W ⊘ (s₁ ⊙ S₂ ⊙ s₃ ⊙ s₄)⌉

with s₁ the grid size (initialised to RTN's scale on the configured grid: one per tensor, row
or (row, group)), S₂ (N, K) one factor per weight, s₃ (N, 1) one per output channel and, for a
convolution, s₄ one per input channel (shared by its kh·kw taps); S₂, s₃, s₄ start at 1, so the
initial Ŵ is RTN's. Rounding is straight-through and the codes are clamped to the grid's range
(asymmetric grids add RTN's zero-point z before clamping, Ŵ = s₁·(q − z); z stays fixed). All
factors are learned with Adam to minimise the output MSE of a reconstruction unit on the
calibration set; since ∂Ŵ/∂S₂ ∝ W/S₂², the division lets large weights move further than
small ones (the paper's "reciprocal rule"). At the end the divisors are folded away: the
stored codes are the rounded values and the stored scale is the learned s₁, so
``dequantize`` gives the learned Ŵ exactly.

Checked against the authors' reference code (FlexRound_LRQ, ``quant/UniformAffineQuantizer.py``
mode 'flexround' and ``quant/REM_fast.py``): the factors are learned in log space (divisor =
exp(δ₁ + δ₂ + δ₃), scale = exp(δ₁)), the rounding is a straight-through ``round``, the codes
are clamped after rounding, Adam updates every δ with one learning rate annealed by a cosine
schedule to 0, and the loss is the squared error of a transformer block's output (summed over
tokens there, a constant multiple of the mean used here). Here log s₁ is stored
as log(RTN scale) + δ₁ with δ₁ = 0 at the start, so the initial scale is RTN's to the bit. The
reference's LLM code has no s₄ for Linear layers; the paper's s₄ is for convolutions (as
also in DeepWok/mase's port, ``flexround_modules.py``; not checked against the paper's text);
here s₄ is used for a weight with more than one column per input channel (a kh·kw > 1 conv; a
1×1 conv is treated as the Linear it is). Its scripts use 5,000 steps, lr 3e-3, 512 samples,
batches of 2 on LLaMA; the defaults here are METHODS.md's (500 steps per unit, lr 1e-3).

Reconstruction units (``reconstruction``):

- ``layer``: every Linear/Conv2d on its own, through ``layerwise.quantize_in_order``: the
  float weight's output on X (the layer's input from the already quantized layers before
  it; a conv's unfolded patches) is the target of the quantized weight's on the same X.
- ``block`` (the paper's setting, after BRECQ): the elements of every nn.ModuleList (MiniLM's
  encoder layers), and of every nn.Sequential whose elements are all of one class (the ViT's
  ``blocks``), are blocks; a quantizable layer outside any block is a unit alone. A ViT block's
  attention in-projection (``<attn>.in_proj``, ``attention.py``) is learned jointly with its
  out_proj and MLP layers. Units go in
  forward order; a unit's input is captured from the model whose earlier units are already
  quantized, the float unit's output on that input is the target, and all its quantizable
  layers are learned jointly. (The reference feeds the quantized block its quantized input
  or, with probability 1/2, the float one, and targets the float model's block output; here
  target and input follow this stage's rule, as in ``layer`` mode.) With an
  ``attention_mask`` in the calibration inputs, padding tokens are left out of the loss.

``batch_size`` calibration examples make one step; in ``layer`` mode, the same fraction of
X's rows. Minibatches are drawn from ``seed``'s generator, epoch by epoch without replacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from tasks.quantize.layerwise import (
    Calibration,
    QuantizedLayer,
    first_example,
    forward_order,
    module_call,
    quantizable,
    quantize_in_order,
    weight_matrix,
    working_copy,
)
from tasks.quantize.layerwise import (
    taps as columns_per_channel,
)
from tasks.quantize.rtn import (
    GridConfig,
    QuantizedWeight,
    code_range,
    fit_grid,
    group_size,
    quantize_weight,
)


class FlexRoundConfig(GridConfig):
    """One FlexRound variant: the grid plus the reconstruction settings."""

    method: Literal["flexround"]
    reconstruction: Literal["layer", "block"] = Field(
        default="block", description="unit whose output is reconstructed: 'layer' = each Linear/Conv2d alone; "
                                     "'block' = each block (an element of a ModuleList, or of a Sequential of one "
                                     "class: transformer blocks) with its layers learned jointly, other layers alone")
    steps: int = Field(default=500, ge=0, description="Adam steps per reconstruction unit")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the log factors, cosine-annealed to 0")
    batch_size: int = Field(default=32, ge=1, description="calibration examples per step")
    seed: int = Field(default=0, description="seed of the generator that draws the minibatches")


class FlexRoundWeight(nn.Module):
    """The learnable FlexRound quantizer of one weight w (N, K) with ``taps`` columns per input channel."""

    def __init__(self, w: Tensor, cfg: GridConfig, taps: int = 1):
        super().__init__()
        n, k = w.shape
        g = group_size(cfg, k)
        wg = w.detach().float().reshape(n, k // g, g)  # (N, G, g)
        tensor = cfg.granularity == "tensor"
        s, z = fit_grid(wg, cfg, per_tensor=tensor)  # (N, G) each, RTN's grid
        rows = slice(0, 1) if tensor else slice(None)  # a per-tensor grid learns one s₁
        self.shape, self.taps, self.cfg = (n, k), taps, cfg
        self.register_buffer("w", wg)
        self.register_buffer("s1_init", s[rows, :1 if tensor else None, None].clone())  # (N|1, G|1, 1)
        self.register_buffer("zero", None if z is None else z[rows, :1 if tensor else None, None].clone())
        self.log_s1 = nn.Parameter(torch.zeros_like(self.s1_init))  # log s₁ − log(RTN scale)
        self.log_s2 = nn.Parameter(torch.zeros_like(wg))  # log S₂, (N, G, g)
        self.log_s3 = nn.Parameter(torch.zeros(n, 1, 1))  # log s₃, per output channel
        self.log_s4 = nn.Parameter(torch.zeros(k // taps)) if taps > 1 else None  # log s₄, per input channel

    def scale(self) -> Tensor:
        """s₁, (N|1, G|1, 1)."""
        return self.s1_init * self.log_s1.exp()

    def codes(self) -> Tensor:
        """Float codes clamp(⌊W ⊘ (s₁·S₂·s₃·s₄)⌉ + z), (N, G, g), rounding straight-through."""
        log_div = self.log_s2 + self.log_s3
        if self.log_s4 is not None:
            log_div = log_div + self.log_s4.repeat_interleave(self.taps).reshape(1, *self.w.shape[1:])
        r = self.w / (self.scale() * log_div.exp())
        q = torch.round(r).detach() + (r - r.detach())  # value round(r) exactly, gradient 1
        if self.zero is not None:
            q = q + self.zero
        return q.clamp(*code_range(self.cfg.bits, self.cfg.symmetric))

    def forward(self) -> Tensor:
        """Ŵ = s₁·(q − z), (N, K) float32."""
        q = self.codes()
        if self.zero is not None:
            q = q - self.zero
        return (q * self.scale()).reshape(self.shape)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The codes and learned grid: ``dequantize`` of it is ``forward()`` exactly."""
        n, k = self.shape
        grid = self.w.shape[:2]  # (N, G)
        return QuantizedWeight(
            codes=self.codes().reshape(n, k).to(torch.int8 if self.cfg.symmetric else torch.uint8),
            scales=self.scale()[..., 0].expand(grid).contiguous(),
            zeros=None if self.zero is None else self.zero[..., 0].expand(grid).contiguous(),
            bits=self.cfg.bits, group_size=self.w.shape[2], shape=(n, k))


def minibatches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches of up to ``batch_size`` of range(n): shuffled epochs, without replacement."""
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if done == steps:
                return
            yield idx
            done += 1


def reconstruct(quantizers: list[FlexRoundWeight], loss: Callable[[Tensor], Tensor], n: int, batch_size: int,
                cfg: FlexRoundConfig) -> None:
    """Adam on every quantizer's log factors against ``loss(indices)`` over ``n`` calibration items."""
    if cfg.steps == 0:
        return
    params = [p for q in quantizers for p in q.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.enable_grad():
        for idx in minibatches(n, batch_size, cfg.steps, gen):
            opt.zero_grad(set_to_none=True)
            loss(idx).backward()
            opt.step()
            sched.step()


def flexround_layer(w: Tensor, x: Tensor, taps: int, cfg: FlexRoundConfig,
                    examples: int | None = None) -> QuantizedLayer:
    """FlexRound one weight w (N, K) on its inputs x (M, K) from ``examples`` calibration examples
    (None: each row is one); the loss is mean (x Ŵᵀ − x Wᵀ)² over a minibatch of rows."""
    quantizer = FlexRoundWeight(w, cfg, taps)
    x = x.float()
    target = x @ w.float().t()  # (M, N)
    rows = cfg.batch_size if examples is None else math.ceil(cfg.batch_size * len(x) / max(examples, 1))
    reconstruct([quantizer], lambda idx: (x[idx] @ quantizer().t() - target[idx]).pow(2).mean(),
                len(x), min(rows, len(x)), cfg)
    return QuantizedLayer(quantizer.quantized())


def _examples(x: Calibration) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def _inside(layer: str, unit: str) -> bool:
    return layer == unit or layer.startswith(unit + ".")


def block_units(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Reconstruction units by name: the outermost blocks (elements of a ModuleList, or of a
    Sequential of one class) holding a quantizable layer, and every quantizable layer in no block."""
    blocks: list[str] = []
    for name, m in model.named_modules():
        repeated = isinstance(m, nn.Sequential) and len(m) > 1 and len({type(c) for c in m}) == 1
        if isinstance(m, nn.ModuleList) or repeated:
            blocks += [f"{name}.{child}" if name else child for child, _ in m.named_children()]
    blocks = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]
    units = {b: model.get_submodule(b) for b in blocks if any(_inside(n, b) for n in layers)}
    units.update({n: m for n, m in layers.items() if not any(_inside(n, b) for b in units)})
    return units


def _take(obj, idx: Tensor, n: int):
    """The examples ``idx`` of every batch-first tensor (2-D or more, n rows) in a nest of args."""
    if isinstance(obj, Tensor):
        return obj[idx] if obj.dim() >= 2 and len(obj) == n else obj
    if type(obj) in (tuple, list):
        return type(obj)(_take(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, idx, n) for k, v in obj.items()}
    return obj


def _first_tensor(y) -> Tensor:
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


def flexround_unit(unit: nn.Module, members: dict[str, nn.Linear | nn.Conv2d], inputs: tuple[tuple, dict],
                   mask: Tensor | None, cfg: FlexRoundConfig) -> dict[str, QuantizedLayer]:
    """Learn the quantizers of ``members`` (names relative to ``unit``; "" is the unit itself) jointly
    so the unit's output on ``inputs`` matches its float output; ``mask`` (n, T) marks the real tokens."""
    args, kwargs = inputs
    with torch.no_grad():
        target = _first_tensor(unit(*args, **kwargs)).float()  # the float unit's output, (n, ...)
    n = len(target)
    if mask is not None and target.shape[:2] != mask.shape:
        mask = None  # an output that is not per token
    quantizers = {rel: FlexRoundWeight(weight_matrix(m), cfg, columns_per_channel(m)) for rel, m in members.items()}

    def loss(idx: Tensor) -> Tensor:
        weights = {f"{rel}.weight" if rel else "weight": q().reshape(members[rel].weight.shape)
                   for rel, q in quantizers.items()}
        y = _first_tensor(functional_call(unit, weights, _take(args, idx, n), _take(kwargs, idx, n)))
        err = (y.float() - target[idx]).pow(2)
        return err.mean() if mask is None else err[mask[idx] != 0].mean()

    reconstruct(list(quantizers.values()), loss, n, min(cfg.batch_size, n), cfg)
    return {rel: QuantizedLayer(q.quantized()) for rel, q in quantizers.items()}


def quantize_blocks(model: nn.Module, x: Calibration | None, cfg: FlexRoundConfig) -> dict[str, QuantizedLayer]:
    """Block-wise FlexRound: units in forward order, each on inputs from the already quantized units
    before it. A unit never called as a module gets RTN. ``model`` is not modified."""
    if x is None:
        raise ValueError(f"quantize.variants: {cfg.name!r} (method {cfg.method}) needs calibration inputs")
    work = working_copy(model).float().requires_grad_(False)  # in-projections as Linear layers
    layers = quantizable(work, cfg)
    units = block_units(work, layers)
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    out: dict[str, QuantizedLayer] = {}
    for uname in forward_order(work, first_example(x), units):
        members = {name[len(uname) + 1:]: m for name, m in layers.items() if _inside(name, uname)}
        inputs = module_call(work, units[uname], x)
        got = ({rel: QuantizedLayer(quantize_weight(weight_matrix(m), cfg)) for rel, m in members.items()} if inputs is None
               else flexround_unit(units[uname], members, inputs, mask, cfg))
        with torch.no_grad():
            for rel, m in members.items():
                m.weight.copy_(got[rel].effective_weight().reshape(m.weight.shape))
                out[f"{uname}.{rel}" if rel else uname] = got[rel]
    return {name: out[name] for name in layers}


def quantize_flexround(model: nn.Module, x: Calibration | None, cfg: FlexRoundConfig) -> dict[str, QuantizedLayer]:
    """FlexRound every quantizable layer of ``model`` on calibration inputs ``x``, layer by layer
    or block by block (``cfg.reconstruction``); ``model`` is not modified."""
    if cfg.reconstruction == "block":
        return quantize_blocks(model, x, cfg)
    n = None if x is None else _examples(x)
    return quantize_in_order(model, x, cfg, lambda w, cols, t, c: flexround_layer(w, cols, t, c, examples=n))
