import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.train.init_config import (
    INIT_SCHEMES,
    EffectiveRankConfig,
    ErkConfig,
    InitField,
    KaimingConfig,
    RewindConfig,
    XavierConfig,
    parse_init,
)


class Train(BaseModel):  # how TrainConfig declares the field
    model_config = ConfigDict(extra="forbid")
    init: InitField = Field(default_factory=KaimingConfig)


def test_old_string_form_still_validates():
    assert Train.model_validate({"init": "kaiming"}).init == KaimingConfig()
    assert Train.model_validate({"init": "xavier"}).init == XavierConfig()
    assert Train().init == KaimingConfig()
    assert parse_init("xavier") == XavierConfig()


def test_settings_free_schemes_dump_as_their_name_and_round_trip():
    assert Train().model_dump(mode="json") == {"init": "kaiming"}
    erk = Train(init={"scheme": "erk", "density": 0.3}).model_dump(mode="json")
    assert erk == {"init": {"scheme": "erk", "density": 0.3, "base": "kaiming"}}
    for value in ("orthogonal", {"scheme": "effective_rank", "rank": "full"},
                  {"scheme": "rewind", "run": "runs/a", "step": 100},
                  {"scheme": "generalized_gaussian", "beta": 0.5}, {"scheme": "pretrained", "path": "m"}):
        t = Train(init=value)
        assert Train.model_validate(t.model_dump(mode="json")) == t


def test_defaults():
    assert parse_init({"scheme": "generalized_gaussian"}).beta == 1.0
    assert parse_init({"scheme": "effective_rank"}).rank == 4
    assert parse_init({"scheme": "erk"}) == ErkConfig(density=0.2, base="kaiming")
    assert parse_init({"scheme": "rewind", "run": "r", "step": 0}) == RewindConfig(run="r", step=0)


@pytest.mark.parametrize("value", ["kaimig", {"scheme": "kaimig"}])
def test_unknown_scheme_lists_the_valid_ones(value):
    with pytest.raises(ValidationError) as e:
        Train(init=value)
    assert "'kaimig' is not one of " + ", ".join(INIT_SCHEMES) in str(e.value)
    with pytest.raises(ValueError, match="train.init: 'kaimig' is not one of kaiming, xavier"):
        parse_init(value)


@pytest.mark.parametrize("value,words", [
    ({"scheme": "generalized_gaussian", "beta": 0}, ["beta", "greater than 0"]),
    ({"scheme": "generalized_gaussian", "beta": 11}, ["beta", "less than or equal to 10"]),
    ({"scheme": "effective_rank", "rank": 0}, ["rank", "'full'"]),
    ({"scheme": "effective_rank", "rank": "half"}, ["rank", "'half'"]),
    ({"scheme": "erk", "density": 0}, ["density", "greater than 0"]),
    ({"scheme": "erk", "density": 1.5}, ["density", "less than or equal to 1"]),
    ({"scheme": "erk", "base": "erk"}, ["base"]),
    ({"scheme": "rewind", "run": "r", "step": -1}, ["step", "greater than or equal to 0"]),
    ({"scheme": "rewind", "step": 3}, ["run", "Field required"]),
    ({"scheme": "pretrained"}, ["path", "Field required"]),
    ({"scheme": "kaiming", "beta": 1.0}, ["beta", "Extra inputs are not permitted"]),
    ({"beta": 1.0}, ["'scheme'", "kaiming, xavier"]),
])
def test_bad_settings_are_named(value, words):
    with pytest.raises(ValueError) as e:
        parse_init(value)
    assert str(e.value).startswith("train.init: ")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_effective_rank_accepts_full_and_positive_ints():
    assert EffectiveRankConfig(rank="full").rank == "full"
    assert parse_init({"scheme": "effective_rank", "rank": 16}).rank == 16
