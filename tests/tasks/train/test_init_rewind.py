import pytest
import torch

from slimforge.artifacts import ArtifactError, save_tensors
from slimforge.models import MLPConfig, ViTConfig, build_model
from tasks.train.init import initialize
from tasks.train.init_config import RewindConfig

SHAPE = (1, 8, 8)
MLP = MLPConfig(hidden=[32])


def _model(cfg=MLP):
    return build_model(cfg, SHAPE, 10)


def _write_run(run, steps, cfg=MLP):
    """A parent run: step-k checkpoints of distinct random weights; returns {step: state}."""
    states = {}
    for k in steps:
        model = _model(cfg)
        initialize(model, "xavier", torch.Generator().manual_seed(100 + k))
        (run / f"step-{k:08d}").mkdir(parents=True)
        save_tensors(run / f"step-{k:08d}" / "model.safetensors", model.state_dict())
        states[k] = {n: t.clone() for n, t in model.state_dict().items()}
    return states


@pytest.mark.parametrize("cfg", [MLP, ViTConfig(patch=4, width=16, depth=1, heads=2, mlp=16)])
def test_rewind_copies_the_step_checkpoint_bit_exactly(tmp_path, cfg):
    states = _write_run(tmp_path / "runs" / "parent", [0, 100, 250], cfg)
    model = _model(cfg)
    masks = initialize(model, {"scheme": "rewind", "run": "runs/parent", "step": 100},
                       torch.Generator().manual_seed(0), root=tmp_path)
    assert masks == {}
    for name, t in model.state_dict().items():
        assert torch.equal(t, states[100][name]), name
    assert not torch.equal(model.state_dict()[next(iter(states[0]))], states[0][next(iter(states[0]))])


def test_absolute_run_path_needs_no_root(tmp_path):
    states = _write_run(tmp_path / "parent", [5])
    model = _model()
    initialize(model, RewindConfig(run=str(tmp_path / "parent"), step=5), torch.Generator())
    assert torch.equal(model.head.weight, states[5]["head.weight"])


def test_missing_step_is_refused_listing_the_available_steps(tmp_path):
    _write_run(tmp_path / "parent", [0, 100, 250])
    model = _model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ArtifactError) as e:
        initialize(model, RewindConfig(run="parent", step=50), torch.Generator(), root=tmp_path)
    msg = str(e.value)
    assert "parent" in msg and "step 50" in msg and "available steps: 0, 100, 250" in msg
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # unchanged


def test_missing_run_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="available steps: none"):
        initialize(_model(), RewindConfig(run="nowhere", step=0), torch.Generator(), root=tmp_path)


def test_checkpoint_of_another_architecture_is_refused_naming_the_tensor(tmp_path):
    _write_run(tmp_path / "parent", [0], MLPConfig(hidden=[64]))
    with pytest.raises(ArtifactError, match=r"step-00000000.*'backbone\.1\.weight' has shape \(64, 64\)"):
        initialize(_model(), RewindConfig(run="parent", step=0), torch.Generator(), root=tmp_path)


def test_mask_keeps_checkpoint_weights_and_zeroes_the_rest(tmp_path):
    states = _write_run(tmp_path / "parent", [10])
    g = torch.Generator().manual_seed(0)
    mask = {"backbone.1.weight": torch.rand(32, 64, generator=g) < 0.3,
            "head.weight": (torch.rand(10, 32, generator=g) < 0.5).float()}
    save_tensors(tmp_path / "mask.safetensors", mask)
    model = _model()
    masks = initialize(model, RewindConfig(run="parent", step=10, mask="mask.safetensors"),
                       torch.Generator(), root=tmp_path)
    assert set(masks) == set(mask)
    for name, m in masks.items():
        w, ref = model.state_dict()[name], states[10][name]
        assert m.dtype == torch.bool
        assert torch.equal(w[m], ref[m]) and torch.all(w[~m] == 0), name
    assert torch.equal(model.state_dict()["backbone.1.bias"], states[10]["backbone.1.bias"])


def test_mask_naming_no_parameter_is_refused(tmp_path):
    _write_run(tmp_path / "parent", [0])
    save_tensors(tmp_path / "mask.safetensors", {"backbone.9.weight": torch.ones(2, 2)})
    with pytest.raises(ArtifactError, match="'backbone.9.weight' names no parameter"):
        initialize(_model(), RewindConfig(run="parent", step=0, mask="mask.safetensors"),
                   torch.Generator(), root=tmp_path)


def test_refused_mask_leaves_the_model_unchanged(tmp_path):
    _write_run(tmp_path / "parent", [0])
    save_tensors(tmp_path / "mask.safetensors", {"head.weight": torch.ones(3, 3)})
    model = _model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ArtifactError, match=r"mask 'head.weight' has shape \(3, 3\)"):
        initialize(model, RewindConfig(run="parent", step=0, mask="mask.safetensors"),
                   torch.Generator(), root=tmp_path)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
