"""train.init: one typed config per initialisation scheme, a discriminated union on ``scheme``.

The old string form still validates: ``train: {init: kaiming}`` is read as
``{scheme: kaiming}``, and a scheme without settings is written back as its bare name, so
``params.yaml`` and meta.json keep their old bytes for the baselines. Declare the field as

    init: InitField = Field(default_factory=KaimingConfig)

The papers behind each scheme are named in the modules of ``tasks/train/inits/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from slimforge.artifacts import LocalPath


class _Init(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KaimingConfig(_Init):
    """He et al. 2015: N(0, 2/fan_in)."""

    scheme: Literal["kaiming"] = "kaiming"


class XavierConfig(_Init):
    """Glorot & Bengio 2010: N(0, 2/(fan_in + fan_out))."""

    scheme: Literal["xavier"] = "xavier"


class OrthogonalConfig(_Init):
    """Saxe et al. 2014: a Haar-random orthogonal matrix times gain sqrt(2)."""

    scheme: Literal["orthogonal"] = "orthogonal"


class GeneralizedGaussianConfig(_Init):
    """p(w) ∝ exp(-|w/α|^β) with Kaiming's variance."""

    scheme: Literal["generalized_gaussian"] = "generalized_gaussian"
    beta: float = Field(1.0, gt=0, le=10, description="shape β: 2 Gaussian, 1 Laplace, <1 heavier tails")


class EffectiveRankConfig(_Init):
    """W = U Vᵀ of rank r, at the Frobenius norm of a Kaiming draw."""

    scheme: Literal["effective_rank"] = "effective_rank"
    rank: int | Literal["full"] = Field(
        4, description="rank r ≥ 1 of every weight matrix (capped at min(out, in·kh·kw)), or 'full'")

    @field_validator("rank", mode="before")
    @classmethod
    def _positive_or_full(cls, v: Any) -> Any:
        if v == "full" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be an integer >= 1 or 'full', got {v!r}")


class ErkConfig(_Init):
    """Erdős–Rényi-Kernel sparse masks over a dense draw."""

    scheme: Literal["erk"] = "erk"
    density: float = Field(0.2, gt=0, le=1, description="fraction of weights kept over all layers")
    base: Literal["kaiming", "xavier", "orthogonal"] = Field(
        "kaiming", description="the dense draw the masks are applied to")


class RewindConfig(_Init):
    """Weights of a parent run's step-k checkpoint (optionally times a pruning mask)."""

    scheme: Literal["rewind"] = "rewind"
    run: str = Field(description="directory of step checkpoints <run>/step-<step:08d>/model.safetensors; "
                                 "relative to the workspace root")
    step: int = Field(ge=0, description="training step to rewind to")
    mask: str | None = Field(None, description="optional safetensors file of {param name: 0/1 mask}; "
                                               "masked weights are set to 0 and the masks returned")


class PretrainedConfig(_Init):
    """Weights of a safetensors checkpoint of the same architecture."""

    scheme: Literal["pretrained"] = "pretrained"
    path: LocalPath = Field(description="a .safetensors file or a directory holding model.safetensors; "
                                        "relative to the workspace root")


_CONFIGS = (KaimingConfig, XavierConfig, OrthogonalConfig, GeneralizedGaussianConfig,
            EffectiveRankConfig, ErkConfig, RewindConfig, PretrainedConfig)
INIT_SCHEMES: tuple[str, ...] = tuple(c.model_fields["scheme"].default for c in _CONFIGS)

InitConfig = Annotated[
    KaimingConfig | XavierConfig | OrthogonalConfig | GeneralizedGaussianConfig
    | EffectiveRankConfig | ErkConfig | RewindConfig | PretrainedConfig,
    Field(discriminator="scheme"),
]


def coerce_init(value: Any) -> Any:
    """'kaiming' -> {'scheme': 'kaiming'}; an unknown scheme names the valid ones."""
    if isinstance(value, str):
        value = {"scheme": value}
    if isinstance(value, dict) and "scheme" not in value:
        raise ValueError(f"a mapping needs 'scheme', one of {', '.join(INIT_SCHEMES)}")
    if isinstance(value, dict) and value["scheme"] not in INIT_SCHEMES:
        raise ValueError(f"{value['scheme']!r} is not one of {', '.join(INIT_SCHEMES)}")
    return value


def dump_init(cfg: _Init) -> str | dict[str, Any]:
    """A scheme without settings is written as its bare name (the old string form)."""
    if set(type(cfg).model_fields) == {"scheme"}:
        return cfg.scheme
    return cfg.model_dump(mode="json")


InitField = Annotated[InitConfig, BeforeValidator(coerce_init), PlainSerializer(dump_init)]
_ADAPTER: TypeAdapter = TypeAdapter(InitField)


def parse_init(value: Any) -> _Init:
    """A config, its dict or its bare scheme name -> the typed config; errors name train.init."""
    if isinstance(value, _CONFIGS):
        return value
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise ValueError(f"train.init: {problems}") from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p not in INIT_SCHEMES)
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg

