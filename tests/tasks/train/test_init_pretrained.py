import pytest
import torch

from slimforge.artifacts import ArtifactError, save_tensors
from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.train.init import initialize
from tasks.train.init_config import PretrainedConfig

SHAPE = (1, 28, 28)


def _trained(cfg, seed=1):
    model = build_model(cfg, SHAPE, 10)
    initialize(model, "orthogonal", torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("cfg", [MLPConfig(), CNNConfig(), ViTConfig(depth=1)])
def test_round_trip_file_and_directory(tmp_path, cfg):
    source = _trained(cfg)
    (tmp_path / "art").mkdir()
    save_tensors(tmp_path / "art" / "model.safetensors", source.state_dict())
    for path in ("art", "art/model.safetensors", str(tmp_path / "art")):
        model = build_model(cfg, SHAPE, 10)
        assert initialize(model, PretrainedConfig(path=path), torch.Generator(), root=tmp_path) == {}
        for (n, p), q in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(p, q), n
        x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(x), source(x))


def test_wrong_architecture_is_refused_naming_file_and_tensor(tmp_path):
    save_tensors(tmp_path / "m.safetensors", _trained(MLPConfig(hidden=[128, 256])).state_dict())
    with pytest.raises(ArtifactError) as e:
        initialize(build_model(MLPConfig(), SHAPE, 10), {"scheme": "pretrained", "path": "m.safetensors"},
                   torch.Generator(), root=tmp_path)
    msg = str(e.value)
    assert "m.safetensors" in msg and "'backbone.1.weight' has shape (128, 784)" in msg


def test_missing_and_extra_tensors_are_named(tmp_path):
    state = dict(_trained(MLPConfig()).state_dict())
    del state["head.bias"]
    save_tensors(tmp_path / "missing.safetensors", state)
    with pytest.raises(ArtifactError, match=r"missing\.safetensors: missing tensor 'head\.bias'"):
        initialize(build_model(MLPConfig(), SHAPE, 10), PretrainedConfig(path="missing.safetensors"),
                   torch.Generator(), root=tmp_path)
    save_tensors(tmp_path / "extra.safetensors", {**_trained(MLPConfig()).state_dict(), "heads.b.weight": torch.ones(1)})
    with pytest.raises(ArtifactError, match=r"unexpected tensor 'heads\.b\.weight'"):
        initialize(build_model(MLPConfig(), SHAPE, 10), PretrainedConfig(path="extra.safetensors"),
                   torch.Generator(), root=tmp_path)


def test_missing_file_and_pickle_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="nothing.safetensors not found"):
        initialize(build_model(MLPConfig(), SHAPE, 10), PretrainedConfig(path="nothing.safetensors"),
                   torch.Generator(), root=tmp_path)
    torch.save(_trained(MLPConfig()).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        initialize(build_model(MLPConfig(), SHAPE, 10), PretrainedConfig(path="model.pt"),
                   torch.Generator(), root=tmp_path)


def test_non_finite_checkpoint_is_refused(tmp_path):
    state = dict(_trained(MLPConfig()).state_dict())
    state["backbone.3.bias"] = torch.full_like(state["backbone.3.bias"], float("nan"))
    save_tensors(tmp_path / "nan.safetensors", state)
    with pytest.raises(ArtifactError, match=r"'backbone\.3\.bias' contains NaN"):
        initialize(build_model(MLPConfig(), SHAPE, 10), PretrainedConfig(path="nan.safetensors"),
                   torch.Generator(), root=tmp_path)
