"""Structured channel pruning: drop whole filters / hidden units and physically remove them.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): rank the filters of a conv
layer by the L1 norm of their weights, sum |K| over input channels and kernel positions,
drop the lowest, and remove the matching input channels of the next layer. The result is a
smaller *dense* model of the same family, so it runs faster with ordinary kernels.

Details reconstructed or extended here:
- Li et al. prune conv filters; we apply the same L1 rule to the hidden units of the
  Linear layers (the CNN's FC layer, every MLP hidden layer) too. The head (classifier)
  keeps all its outputs; only its input columns are sliced.
- One keep fraction k for every layer (the paper picks per-layer ratios from a
  sensitivity scan); kept count = max(1, round(k·width)), Python rounding (half to even).
- Both of the paper's multi-layer strategies (its section 3.3): ``independent`` scores a
  layer's filters on all their weights; ``greedy`` (default, better in the paper's Fig. 4)
  leaves out the kernels that read channels already removed from the previous layer.
- Ties in L1 norm keep the lower index, so the result is deterministic.
- At the conv -> Flatten -> Linear transition the Linear reads the flattened (C, H, W)
  map, so channel c owns columns c·H·W .. c·H·W + H·W - 1 and all of them go together.

The equivalent masks on the original model zero each dropped unit's weights *and bias*
and the next layer's inputs from it. Masking only the next layer's inputs would already
give the same logits, but the dropped unit would still emit the constant relu(b) into the
masked model; zeroing its bias too makes every parameter the shrunk model lacks exactly zero
(so the masked model's nonzero count equals the shrunk model's parameter count) and makes
the dropped channels' activations exactly zero, layer by layer, not only at the output.
This is the one prune method whose masks cover biases.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.prune.common import PruneBase, PruneContext, Pruned

SUPPORTED_ARCHS = ("cnn", "mlp")


class ChannelConfig(PruneBase):

    method: Literal["channel"] = "channel"
    keep_fraction: float = Field(
        default=0.5, gt=0, le=1,
        description="share of output channels (conv) / hidden units (Linear) kept in every backbone layer, "
                    "unitless; kept count = max(1, round(keep_fraction * width))")
    strategy: Literal["greedy", "independent"] = Field(
        default="greedy",
        description="greedy: a filter's L1 norm leaves out kernels reading already-removed channels; "
                    "independent: L1 over all its weights (Li et al. 2017, sec. 3.3)")


class ChannelPruned(NamedTuple):
    config: CNNConfig | MLPConfig  # the slim architecture, for slimforge.models.build_model
    state_dict: dict[str, Tensor]  # loads into build_model(config, same input shape, same classes)
    masks: dict[str, Tensor]  # {param name: bool} on the ORIGINAL model, weights and biases
    kept: dict[str, Tensor]  # {layer name: sorted kept output-unit indices}, head excluded


def kept_count(width: int, keep_fraction: float) -> int:
    """Units kept out of ``width``: max(1, round(k·width))."""
    return max(1, round(keep_fraction * width))


def slim_config(model_cfg: CNNConfig | MLPConfig, keep_fraction: float) -> CNNConfig | MLPConfig:
    """The architecture config with every backbone width scaled by ``keep_fraction``."""
    _check_arch(model_cfg)
    if isinstance(model_cfg, CNNConfig):
        hidden = kept_count(model_cfg.hidden, keep_fraction) if model_cfg.hidden else 0
        return model_cfg.model_copy(update={"channels": [kept_count(c, keep_fraction) for c in model_cfg.channels],
                                            "hidden": hidden})
    return model_cfg.model_copy(update={"hidden": [kept_count(h, keep_fraction) for h in model_cfg.hidden]})


def _check_arch(model_cfg) -> None:
    arch = getattr(model_cfg, "arch", type(model_cfg).__name__)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"prune.channel: arch {arch!r} is not supported (for a vit use prune.method: heads); "
                         f"supported archs: {', '.join(SUPPORTED_ARCHS)}")


def _layers(model: nn.Module, model_cfg: CNNConfig | MLPConfig) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv2d layers in forward order (registration order in build_model), head last."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    widths = ([*model_cfg.channels, *([model_cfg.hidden] if model_cfg.hidden else [])]
              if isinstance(model_cfg, CNNConfig) else list(model_cfg.hidden))
    found = [m.weight.shape[0] for _, m in layers[:-1]]
    if not layers or layers[-1][0] != "head" or found != widths:
        raise ValueError(f"prune.channel: the model's layer widths {found} (head last: "
                         f"{layers[-1][0] if layers else None!r}) do not match its config {model_cfg!r}")
    return layers


def _keep_largest(scores: Tensor, keep: int) -> Tensor:
    """Sorted indices of the ``keep`` largest scores; ties keep the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:keep].sort().values


def _input_index(prev_keep: Tensor, prev_width: int, in_features: int) -> Tensor:
    """Input positions of a layer fed by the kept units of the previous one.

    A conv after a conv, or a Linear after a Linear, reads one input per unit. A Linear
    after Flatten reads (C, H, W) flattened: channel c owns columns c·HW .. c·HW + HW - 1.
    """
    per_unit = in_features // prev_width  # H·W after the last pool, else 1
    return (prev_keep[:, None] * per_unit + torch.arange(per_unit)).flatten()


def _mask_like(weight: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bool mask of ``weight``'s shape, True on the kept rows x kept input columns (all kernel taps)."""
    mask = torch.zeros(weight.shape[:2], dtype=torch.bool)
    mask[rows[:, None], cols[None, :]] = True
    return mask.reshape(*mask.shape, *[1] * (weight.dim() - 2)).expand_as(weight).clone()


@torch.no_grad()
def prune_channels(model: nn.Module, model_cfg: CNNConfig | MLPConfig, cfg: ChannelConfig) -> ChannelPruned:
    """Drop the lowest-L1 output units of every backbone layer; keep the head's outputs.

    ``model`` is built by ``build_model(model_cfg, ...)`` and is left unchanged.
    """
    _check_arch(model_cfg)
    layers = _layers(model, model_cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    in_keep: Tensor | None = None  # the first layer reads every input
    for i, (name, layer) in enumerate(layers):
        w = layer.weight.detach()  # (out, in) or (out, in, kh, kw)
        cols = torch.arange(w.shape[1]) if in_keep is None else in_keep
        if name == "head":
            rows = torch.arange(w.shape[0])
        else:
            scored = w if cfg.strategy == "independent" else w.index_select(1, cols)
            scores = scored.abs().flatten(1).sum(1)  # L1 per output unit, (out,)
            rows = _keep_largest(scores, kept_count(w.shape[0], cfg.keep_fraction))
            kept[name] = rows
        state[f"{name}.weight"] = w.index_select(0, rows).index_select(1, cols).clone()
        masks[f"{name}.weight"] = _mask_like(w, rows, cols)
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().index_select(0, rows).clone()
            masks[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=torch.bool).index_fill_(0, rows, True)
        if i + 1 < len(layers):
            in_keep = _input_index(rows, w.shape[0], layers[i + 1][1].weight.shape[1])
    return ChannelPruned(slim_config(model_cfg, cfg.keep_fraction), state, masks, kept)


def prune_channel(ctx: PruneContext, cfg: ChannelConfig) -> Pruned:
    """The registry entry: a physically smaller dense model of the same family."""
    out = prune_channels(ctx.model, ctx.model_config, cfg)
    slim = build_model(out.config, ctx.input_shape, ctx.num_classes)
    slim.load_state_dict(out.state_dict)
    kept = {name: len(idx) for name, idx in out.kept.items()}
    return Pruned(slim.eval(), model_config=out.config, report={"kept_units": kept})
