"""An attention's stacked q/k/v in-projection as one more quantizable Linear layer, ``<attn>.in_proj``.

nn.MultiheadAttention and ``slimforge.models.SlimAttention`` hold W_q, W_k, W_v stacked in one
parameter, ``in_proj_weight`` (3·inner, width), with ``in_proj_bias`` (3·inner,), and no module
computes with it: nothing that works on Linear modules (calibration hooks, FlexRound's
``functional_call``, the packed low-bit modules) reaches it, and MultiheadAttention's fused forward
also reads ``out_proj.weight`` without calling ``out_proj``. ``split_attentions`` replaces such an
attention with a ``QkvAttention`` computing the same function whose in-projection is a module,
``in_proj`` = nn.Linear(width, 3·inner) holding in_proj_weight and in_proj_bias, called once on
the query input; its output (…, 3·inner) is chunked into q, k, v and ``out_proj`` is called as a
module. The quantize methods calibrate and quantize a working copy split this way
(``layerwise.working_copy``), so the in-projection is a layer like any other; its input X is the
attention's query input, which in the ViT's self-attention is also the key and value input (the
block's norm1 output).

Names: in the split model the layer is the module ``<attn>.in_proj``; in the float model it is
the parameter ``<attn>.in_proj_weight`` (``weight_key``). The packed file keeps the float model's
names for everything that stays float (``<attn>.in_proj_bias`` included) and stores the codes under
``<attn>.in_proj.*`` like any layer's; ``packed.load_quantized`` splits the attentions whose
in-projection it holds and runs ``in_proj`` on the packed kernels (one low-bit matmul of the
stacked weight, then the chunk).

Only attentions of the self-contained form are split: SlimAttention, and nn.MultiheadAttention
with batch_first=True, one embedding dimension for q, k and v, and no bias_k/bias_v or zero
attention (what ``_Block`` builds). Dropout is left out: the split module is for inference.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from slimforge.models import SlimAttention

IN_PROJ = "in_proj"  # the child name of an attention's in-projection in a split model


class QkvAttention(nn.Module):
    """Multi-head attention computing q, k, v with one module ``in_proj`` (width -> 3·inner), then
    ``F.scaled_dot_product_attention`` and ``out_proj`` (inner -> width); called as
    nn.MultiheadAttention(batch_first=True) without masks, returning (output, None)."""

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, heads: int, head_dim: int):
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.heads, self.head_dim = heads, head_dim

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("QkvAttention does not return attention weights; call it with need_weights=False")
        if query is key and key is value:  # self-attention: one matmul of the stacked weight
            q, k, v = self.in_proj(query).chunk(3, dim=-1)  # (B, T, inner) each
        else:  # each input through the stacked projection, keeping its third
            q, k, v = (self.in_proj(t).chunk(3, dim=-1)[i] for i, t in enumerate((query, key, value)))
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √hd) v, (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None  # (B, T, width)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


def splittable(module: nn.Module) -> bool:
    """Whether ``module`` is an attention ``qkv_attention`` can split (see the module docstring)."""
    if isinstance(module, SlimAttention):
        return True
    return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
            and module.in_proj_weight is not None and module.bias_k is None and not module.add_zero_attn)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding copies of weight (N, K) and bias (N,), trainable as weight is."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight.detach())
    if bias is not None:
        out.bias.data.copy_(bias.detach())
    return out.requires_grad_(weight.requires_grad)


def qkv_attention(attn: nn.Module) -> QkvAttention:
    """The QkvAttention computing what ``attn`` (splittable) computes, with copies of its parameters."""
    heads = attn.heads if isinstance(attn, SlimAttention) else attn.num_heads
    # out_proj becomes a plain Linear (MultiheadAttention's is a NonDynamicallyQuantizableLinear)
    return QkvAttention(_linear(attn.in_proj_weight, attn.in_proj_bias),  # (3·inner, width)
                        _linear(attn.out_proj.weight, attn.out_proj.bias),  # (width, inner)
                        heads, attn.head_dim).train(attn.training)


def split_attentions(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace every splittable attention of ``model`` (or the ones named) by its QkvAttention, in
    place; the names replaced."""
    names = [n for n, m in model.named_modules() if n and splittable(m)] if names is None else names
    if "" in names:
        raise ValueError("split_attentions: the model itself is an attention; split its parent instead")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, qkv_attention(model.get_submodule(name)))
    return names


def in_proj_owner(model: nn.Module, name: str) -> str | None:
    """The attention whose in-projection the layer ``name`` is, when ``model`` still holds that
    attention unsplit (``<attn>.in_proj`` of a splittable attention), else None."""
    parent, _, child = name.rpartition(".")
    if child != IN_PROJ or not parent:
        return None
    try:
        return parent if splittable(model.get_submodule(parent)) else None
    except AttributeError:
        return None


def in_proj_owners(model: nn.Module, names) -> list[str]:
    """The unsplit attentions of ``model`` whose in-projection is among the layers ``names``."""
    return [o for o in (in_proj_owner(model, n) for n in names) if o]


def weight_key(model: nn.Module, name: str) -> str:
    """The state-dict key of layer ``name``'s weight in ``model``: ``<name>.weight``, or an unsplit
    attention's ``<attn>.in_proj_weight``."""
    owner = in_proj_owner(model, name)
    return f"{name}.weight" if owner is None else f"{owner}.in_proj_weight"
