"""prune: make the trained model sparse, structurally smaller or low-rank.

The registry below is the one place a ``prune.method`` name is resolved. Each entry is
(config class, function(ctx: PruneContext, cfg) -> Pruned); the stage runs recovery and
writes the artifact (sparse-stored when the result is masked).
"""

from collections.abc import Callable
from typing import Annotated, NamedTuple, Union

from pydantic import BaseModel, Discriminator, Tag

from tasks.prune.channel import ChannelConfig, prune_channel
from tasks.prune.gradual import GradualConfig, prune_gradual
from tasks.prune.heads import HeadConfig, prune_heads
from tasks.prune.imp import ImpConfig, prune_imp
from tasks.prune.layer_adaptive import LayerAdaptiveConfig, prune_layer_adaptive
from tasks.prune.lowrank import SvdConfig, prune_svd
from tasks.prune.magnitude import (
    MagnitudeConfig,
    apply_masks,
    magnitude_masks,
    prunable,
    prune_magnitude,
)
from tasks.prune.nm import NmConfig, prune_nm
from tasks.prune.random import RandomConfig, prune_random
from tasks.prune.soup import SparseSoupConfig, prune_sparse_soup
from tasks.prune.trp import TrpConfig, prune_trp
from tasks.prune.welore import WeLoreConfig, prune_welore


class Method(NamedTuple):
    config: type[BaseModel]
    prune: Callable


METHODS: dict[str, Method] = {
    "magnitude": Method(MagnitudeConfig, prune_magnitude),
    "random": Method(RandomConfig, prune_random),
    "imp": Method(ImpConfig, prune_imp),
    "gmp": Method(GradualConfig, prune_gradual),
    "granet": Method(GradualConfig, prune_gradual),
    "layer_adaptive": Method(LayerAdaptiveConfig, prune_layer_adaptive),
    "nm": Method(NmConfig, prune_nm),
    "channel": Method(ChannelConfig, prune_channel),
    "heads": Method(HeadConfig, prune_heads),
    "svd": Method(SvdConfig, prune_svd),
    "welore": Method(WeLoreConfig, prune_welore),
    "trp": Method(TrpConfig, prune_trp),
    "sparse_soup": Method(SparseSoupConfig, prune_sparse_soup),
}

DEFAULT_METHOD = "magnitude"


def _method_of(value) -> str:
    """The union's tag: a section that names no method is a magnitude one."""
    if isinstance(value, dict):
        return value.get("method", DEFAULT_METHOD)
    # not a mapping (a list, a number): the default method's model reports the wrong type
    return getattr(value, "method", DEFAULT_METHOD)


PruneConfig = Annotated[Union[tuple(Annotated[m.config, Tag(name)] for name, m in METHODS.items())],  # noqa: UP007
                        Discriminator(_method_of)]

__all__ = ["METHODS", "MagnitudeConfig", "Method", "PruneConfig", "apply_masks", "magnitude_masks", "prunable"]
