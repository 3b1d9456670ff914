"""Params are validated before any stage runs, with file, key path, value and valid choices."""

from pathlib import Path

import pytest
import yaml

from slimforge.config import ParamsError, dump_params, load_params

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_presets_are_valid_and_params_yaml_is_the_default_experiment():
    for preset in (REPO / "params").glob("*.yaml"):
        load_params(preset)
    assert (REPO / "params.yaml").read_text() == dump_params(load_params(REPO / "params/default.yaml"))


@pytest.mark.parametrize("text,expected", [
    ("train:\n  init: kaimig\n", ["p.yaml: train.init: 'kaimig'", "kaiming, xavier, orthogonal, generalized_gaussian"]),
    ("train:\n  epochs: many\n", ["train.epochs: 'many'", "integer"]),
    ("trian:\n  epochs: 3\n", ["trian", "Extra inputs are not permitted"]),
    ("train:\n  lr: -1\n", ["train.lr: -1", "greater than 0"]),
    ("select:\n  method: coreset\n", ["select", "'coreset'", "'random', 'el2n'"]),
    ("select:\n  method: el2n\n  keep_fraction: 1.5\n", ["select.keep_fraction: 1.5"]),
    ("train:\n  model: {arch: cnn, widths: [4]}\n", ["train.model.widths"]),
    ("train:\n  init: {scheme: erk, density: 2}\n", ["train.init.density: 2"]),
    ("quantize:\n  variants: [{name: a, bits: 5}]\n", ["quantize.variants.0.bits: 5"]),
    ("finetune:\n  tasks: [{name: a, transform: spin}]\n", ["finetune.tasks.0.transform: 'spin'", "rotate90"]),
    ("ingest:\n  dataset: imagenet\n", ["ingest.dataset: 'imagenet'", "mnist5k"]),
])
def test_bad_params_name_file_key_value_and_choices(tmp_path, text, expected):
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, text))
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 3\n")
    assert load_params(path, ["train.epochs=5", "prune.sparsity=0.5"]).train.epochs == 5
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(path, ["train.epochs=-2"])
    with pytest.raises(ParamsError, match="key.path=value"):
        load_params(path, ["train.epochs"])


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(_write(tmp_path, "train: [\n"))
    with pytest.raises(ParamsError, match="mapping"):
        load_params(_write(tmp_path, "- 1\n- 2\n"))


def test_resolved_params_round_trip(tmp_path):
    params = load_params(REPO / "params/tiny.yaml")
    again = load_params(_write(tmp_path, dump_params(params)))
    assert again == params
    assert yaml.safe_load(dump_params(params))["select"]["method"] == "el2n"
