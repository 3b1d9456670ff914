"""Attention-head pruning of the ViT: drop whole heads and physically remove them.

Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?" (NeurIPS 2019). A gate
ξ_h = 1 multiplies the output of head h, Att_h(x) = W_o^h Σ_i α_i W_v^h x_i (the head's share of
the output projection, its bias excluded; sec. 2.3), and a head's importance is the expected
sensitivity of the loss to its gate (eq. 2):

    I_h = E_x |∂L(x)/∂ξ_h| = E_x |Att_h(x)ᵀ ∂L(x)/∂Att_h(x)|,

normalised per layer by the ℓ2 norm of that layer's scores (as the paper does, after Molchanov
et al. 2017). All heads of the model are ranked together and the least important go. The result
is a smaller dense ViT: ``ViTConfig.block_heads`` records each block's head count, and a pruned
block loses its heads' q/k/v rows and out_proj columns (``slimforge.models.SlimAttention``).

Checked against the paper: the gate on the head's output; eq. 2, |·| per example before the
mean; ℓ2 normalisation per layer; one global ranking computed once (sec. 4 sorts all heads by
I_h and removes them in that order).

Reconstructed or extended here:
- L(x) is the cross-entropy against the label, over ``examples`` training examples drawn with
  the stage's generator (the paper estimates I_h on the training data or a subset).
- One cut instead of the paper's sweep: keep K = max(depth, round(keep_fraction · N)) of the N
  heads, at least one per block (the paper may empty a layer; a block here needs a head). Each
  block's most important head is reserved first; the other K − depth places go to the most
  important remaining heads. Ties keep the lower (block, head) index.
- ``importance: l1`` is a data-free alternative, not in the paper: the L1 norm of the head's q,
  k and v rows of ``in_proj_weight`` plus its ``out_proj`` columns, normalised per layer alike.
- Per-example gradients come from one backward pass per batch: every example gets its own gates
  (B, H), and examples do not interact in the ViT, so ∂Σ_x L(x)/∂ξ_{x,h} = ∂L(x)/∂ξ_h.
- Not in the paper: ``mlp_keep_fraction`` < 1 also drops each block's MLP hidden units with the
  lowest L1 norm of their input weights (rows of the first Linear), the rule of Li et al.,
  "Pruning Filters for Efficient ConvNets" (ICLR 2017; ``prune.method: channel``), per block:
  kept = max(1, round(k·width)); the second Linear loses the matching input columns and
  ``ViTConfig.block_mlp`` records the widths. GELU(0) = 0, so a unit whose input row and bias
  are zeroed contributes nothing: the slim model equals that masked one.
"""

from __future__ import annotations

import copy
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from slimforge.models import SlimAttention, ViTConfig, build_model
from tasks.prune.channel import kept_count
from tasks.prune.common import PruneBase, PruneContext, Pruned, keep_largest

BATCH = 256  # examples per forward/backward pass of the gradient importance


class HeadConfig(PruneBase):

    method: Literal["heads"] = "heads"
    keep_fraction: float = Field(
        default=0.5, gt=0, le=1,
        description="share of all attention heads kept, unitless; kept count = max(depth, "
                    "round(keep_fraction * total heads)), at least one head per block")
    importance: Literal["gradient", "l1"] = Field(
        default="gradient",
        description="gradient: E_x |dL(x)/d gate_h| on training examples (Michel et al. 2019, eq. 2); "
                    "l1: L1 norm of the head's q/k/v rows and out_proj columns (data-free)")
    examples: int = Field(
        default=512, ge=1,
        description="training examples the gradient importance averages over (count), drawn with the "
                    "prune seed; the whole training set if it is smaller; unused by l1")
    mlp_keep_fraction: float = Field(
        default=1.0, gt=0, le=1,
        description="share of each block's MLP hidden units kept, by the L1 norm of their input weights, "
                    "unitless; kept count = max(1, round(mlp_keep_fraction * width)); 1 = MLPs untouched")


class HeadsPruned(NamedTuple):
    config: ViTConfig  # the slim architecture (block_heads, block_mlp set), for build_model
    state_dict: dict[str, Tensor]  # loads into build_model(config, same input shape, same classes)
    kept: dict[str, Tensor]  # {attention module name: sorted kept head indices}
    importance: dict[str, Tensor]  # {attention module name: per-layer normalised score per head}
    kept_mlp: dict[str, Tensor]  # {block MLP name: sorted kept hidden-unit indices}


def check_vit(model_cfg) -> None:
    """Refuse an architecture without attention heads, naming the method that fits it."""
    arch = getattr(model_cfg, "arch", type(model_cfg).__name__)
    if arch != "vit":
        raise ValueError(f"prune.heads: arch {arch!r} has no attention heads; supported arch: vit "
                         "(for a cnn or mlp use prune.method: channel)")


def attentions(model: nn.Module, model_cfg: ViTConfig) -> dict[str, nn.Module]:
    """{name: attention module} of every ViT block, in order; refuses a model that does not fit."""
    check_vit(model_cfg)
    head_dim = model_cfg.width // model_cfg.heads
    out = {f"backbone.blocks.{i}.attn": block.attn for i, block in enumerate(model.backbone.blocks)}
    found = [m.in_proj_weight.shape[0] // (3 * head_dim) for m in out.values()]
    expected = [model_cfg.heads_of(i) for i in range(model_cfg.depth)]
    if found != expected:
        raise ValueError(f"prune.heads: the model's heads per block {found} do not match its config "
                         f"{expected} ({model_cfg!r})")
    return out


def mlps(model: nn.Module, model_cfg: ViTConfig) -> dict[str, nn.Sequential]:
    """{name: Sequential(Linear, GELU, Linear)} of every ViT block's MLP; refuses a mismatch."""
    out = {f"backbone.blocks.{i}.mlp": block.mlp for i, block in enumerate(model.backbone.blocks)}
    found = [m[0].out_features for m in out.values()]
    expected = [model_cfg.mlp_of(i) for i in range(model_cfg.depth)]
    if found != expected:
        raise ValueError(f"prune.heads: the model's MLP widths {found} do not match its config {expected}")
    return out


def mlp_units(model: nn.Module, model_cfg: ViTConfig, keep_fraction: float) -> dict[str, Tensor]:
    """Sorted kept hidden units per block: the max(1, round(k·width)) largest L1 norms of the first
    Linear's rows; ties keep the lower index."""
    out = {}
    for name, mlp in mlps(model, model_cfg).items():
        scores = mlp[0].weight.detach().abs().sum(1)  # L1 per hidden unit, (width,)
        out[name] = keep_largest(scores, kept_count(len(scores), keep_fraction)).nonzero().flatten()
    return out


def head_channels(heads: Tensor, head_dim: int) -> Tensor:
    """Positions of the given heads' channels on a (heads·head_dim) axis, in head order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def gate_gradients(model: nn.Module, model_cfg: ViTConfig, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """∂L(x)/∂ξ_h at ξ = 1 for every example and head: {attention name: (n, heads of the block)}.

    A copy of ``model`` attends with SlimAttention (same weights), whose ``out_proj`` input,
    the concatenated head outputs (B, T, H·head_dim), is multiplied by per-example gates.
    """
    head_dim = model_cfg.width // model_cfg.heads
    gated = copy.deepcopy(model).eval().requires_grad_(False)
    gates: dict[str, Tensor] = {}  # {attention name: (B, heads)}, ones, replaced every batch
    slims: dict[str, SlimAttention] = {}
    for name, attn in attentions(gated, model_cfg).items():
        slims[name] = SlimAttention(model_cfg.width, attn.in_proj_weight.shape[0] // (3 * head_dim), head_dim)
        slims[name].to(attn.in_proj_weight.dtype).requires_grad_(False).load_state_dict(attn.state_dict())
        slims[name].out_proj.register_forward_pre_hook(
            lambda _m, args, name=name: (args[0] * gates[name].repeat_interleave(head_dim, 1)[:, None, :],))
        gated.get_submodule(name.rpartition(".")[0]).attn = slims[name]
    out: dict[str, list[Tensor]] = {name: [] for name in slims}
    for xb, yb in zip(x.split(BATCH), y.split(BATCH), strict=True):
        gates.update({name: torch.ones(len(xb), slim.heads, dtype=xb.dtype, requires_grad=True)
                      for name, slim in slims.items()})
        loss = F.cross_entropy(gated(xb), yb, reduction="sum")  # Σ_x L(x): each gate row sees one example
        for name, grad in zip(gates, torch.autograd.grad(loss, list(gates.values())), strict=True):
            out[name].append(grad)
    return {name: torch.cat(g) for name, g in out.items()}


def gradient_importance(model: nn.Module, model_cfg: ViTConfig, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Eq. 2 before normalisation: the mean over examples of |∂L(x)/∂ξ_h|, per head."""
    return {name: g.abs().mean(0) for name, g in gate_gradients(model, model_cfg, x, y).items()}


@torch.no_grad()
def l1_importance(model: nn.Module, model_cfg: ViTConfig) -> dict[str, Tensor]:
    """Per head: Σ|w| over its q, k and v rows of in_proj_weight and its out_proj columns."""
    head_dim = model_cfg.width // model_cfg.heads
    out = {}
    for name, attn in attentions(model, model_cfg).items():
        heads = attn.in_proj_weight.shape[0] // (3 * head_dim)
        qkv = attn.in_proj_weight.abs().view(3, heads, head_dim, -1).sum((0, 2, 3))  # (H,)
        o = attn.out_proj.weight.abs().view(-1, heads, head_dim).sum((0, 2))  # (H,)
        out[name] = qkv + o
    return out


def normalise_per_layer(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's scores divided by their ℓ2 norm; a layer of all-zero scores stays zero."""
    return {name: s / s.norm().clamp_min(torch.finfo(s.dtype).tiny) for name, s in scores.items()}


def choose_heads(scores: dict[str, Tensor], keep_fraction: float) -> dict[str, Tensor]:
    """Sorted kept head indices per layer: the globally best max(layers, round(k·N)) heads,
    each layer's best head reserved first; ties keep the lower (layer, head) index."""
    flat = torch.cat(list(scores.values()))
    layer = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores.values())])
    keep = max(len(scores), round(keep_fraction * len(flat)))
    order = torch.argsort(flat, descending=True, stable=True)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    best = torch.stack([order[layer[order] == i][0] for i in range(len(scores))])  # each layer's best head
    chosen[best] = True
    chosen[order[~chosen[order]][: keep - len(scores)]] = True
    start, out = 0, {}
    for name, s in scores.items():
        out[name] = chosen[start : start + len(s)].nonzero().flatten()
        start += len(s)
    return out


@torch.no_grad()
def slice_blocks(model: nn.Module, model_cfg: ViTConfig, kept: dict[str, Tensor],
                 kept_mlp: dict[str, Tensor]) -> tuple[ViTConfig, dict[str, Tensor]]:
    """The slim config and state dict keeping only the ``kept`` heads and ``kept_mlp`` hidden
    units; ``model`` is left unchanged."""
    head_dim = model_cfg.width // model_cfg.heads
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, attn in attentions(model, model_cfg).items():
        inner = attn.in_proj_weight.shape[0] // 3
        cols = head_channels(kept[name], head_dim)  # the kept heads' channels in q, k, v and out_proj's input
        rows = torch.cat([part * inner + cols for part in range(3)])
        state[f"{name}.in_proj_weight"] = attn.in_proj_weight.index_select(0, rows).clone()
        state[f"{name}.in_proj_bias"] = attn.in_proj_bias.index_select(0, rows).clone()
        state[f"{name}.out_proj.weight"] = attn.out_proj.weight.index_select(1, cols).clone()
    for name, mlp in mlps(model, model_cfg).items():
        units = kept_mlp[name]
        state[f"{name}.0.weight"] = mlp[0].weight.index_select(0, units).clone()  # (kept, width)
        state[f"{name}.0.bias"] = mlp[0].bias.index_select(0, units).clone()
        state[f"{name}.2.weight"] = mlp[2].weight.index_select(1, units).clone()  # (width, kept)
    config = model_cfg.model_copy(update={"block_heads": [len(v) for v in kept.values()],
                                          "block_mlp": [len(v) for v in kept_mlp.values()]})
    return config, state


def prune_heads_of(model: nn.Module, model_cfg: ViTConfig, cfg: HeadConfig,
                   x: Tensor, y: Tensor, g: torch.Generator) -> HeadsPruned:
    """Score every head (``cfg.importance``), keep the best globally, keep each block's largest
    MLP units (``cfg.mlp_keep_fraction``) and slice the rest away."""
    check_vit(model_cfg)
    if cfg.importance == "gradient":
        subset = torch.randperm(len(x), generator=g)[: cfg.examples]
        raw = gradient_importance(model, model_cfg, x[subset], y[subset])
    else:
        raw = l1_importance(model, model_cfg)
    importance = normalise_per_layer(raw)
    kept = choose_heads(importance, cfg.keep_fraction)
    kept_mlp = mlp_units(model, model_cfg, cfg.mlp_keep_fraction)
    config, state = slice_blocks(model, model_cfg, kept, kept_mlp)
    return HeadsPruned(config, state, kept, importance, kept_mlp)


def prune_heads(ctx: PruneContext, cfg: HeadConfig) -> Pruned:
    """The registry entry: a ViT with fewer attention heads (and MLP units), smaller and dense."""
    out = prune_heads_of(ctx.model, ctx.model_config, cfg, ctx.x, ctx.y, ctx.generator)
    slim = build_model(out.config, ctx.input_shape, ctx.num_classes)
    slim.load_state_dict(out.state_dict)
    report = {"kept_heads": {name: len(idx) for name, idx in out.kept.items()},
              "head_importance": {name: [round(float(v), 6) for v in s] for name, s in out.importance.items()},
              "kept_mlp_units": {name: len(idx) for name, idx in out.kept_mlp.items()}}
    return Pruned(slim.eval(), model_config=out.config, report=report)
