import pytest
import torch

from tasks.merge.patches import PatchConfig, apply_patches, make_patch, patch_delta


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": scale * torch.randn(16, 3, 3, 3, generator=g), "conv.bias": scale * torch.randn(16, generator=g),
            "fc.weight": scale * torch.randn(10, 33, generator=g), "steps": torch.tensor(7)}


def test_full_precision_patch_then_unpatch_is_the_identity():
    base, tau = _state(0), _state(1, 0.1)
    patch = make_patch(tau, PatchConfig())
    patched = apply_patches(base, [(patch, 1.0)])
    for name in ("conv.weight", "fc.weight"):
        torch.testing.assert_close(patched[name], base[name] + tau[name])
    back = apply_patches(patched, [(patch, -1.0)])
    for name, w in base.items():
        torch.testing.assert_close(back[name], w, rtol=0, atol=1e-6)


def test_layers_restrict_the_patch_and_other_tensors_stay_the_base():
    base, tau = _state(0), _state(1, 0.1)
    patch = make_patch(tau, PatchConfig(layers=["conv.*"]))
    assert set(patch.layout) == {"conv.weight", "conv.bias"}
    patched = apply_patches(base, [(patch, 0.5)])
    assert torch.equal(patched["fc.weight"], base["fc.weight"]) and torch.equal(patched["steps"], base["steps"])
    torch.testing.assert_close(patched["conv.bias"], base["conv.bias"] + 0.5 * tau["conv.bias"])


def test_low_rank_patch_is_the_best_rank_r_approximation_and_smaller():
    g = torch.Generator().manual_seed(0)
    tau = {"fc.weight": torch.randn(64, 4, generator=g) @ torch.randn(4, 80, generator=g)
           + 0.01 * torch.randn(64, 80, generator=g)}
    patch = make_patch(tau, PatchConfig(rank=4))
    delta = patch_delta(patch)["fc.weight"]
    s = torch.linalg.svdvals(tau["fc.weight"].double())
    err = torch.linalg.matrix_norm((delta - tau["fc.weight"]).double())
    torch.testing.assert_close(err, s[4:].square().sum().sqrt(), rtol=1e-4, atol=0)  # Eckart–Young
    assert patch.nbytes == 4 * 4 * (64 + 80)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_quantized_patch_error_is_within_half_a_step_and_bytes_shrink(bits):
    tau = _state(1, 0.1)
    full, patch = make_patch(tau, PatchConfig()), make_patch(tau, PatchConfig(bits=bits))
    assert patch.nbytes < full.nbytes * (0.55 if bits == 16 else 0.3 if bits == 8 else 0.2)
    for name, delta in patch_delta(patch).items():
        rows = tau[name].reshape(tau[name].shape[0] if tau[name].dim() > 1 else 1, -1)
        step = rows.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1) if bits < 16 else 1e-3 * rows.abs()
        assert ((delta.reshape(rows.shape) - rows).abs() <= step / 2 + 1e-7).all(), name


def test_two_patches_combine_additively_and_mismatch_names_the_tensor():
    base, t1, t2 = _state(0), _state(1, 0.1), _state(2, 0.1)
    p1, p2 = make_patch(t1, PatchConfig()), make_patch(t2, PatchConfig())
    both = apply_patches(base, [(p1, 1.0), (p2, 0.5)])
    torch.testing.assert_close(both["fc.weight"], base["fc.weight"] + t1["fc.weight"] + 0.5 * t2["fc.weight"])
    bad = {**base, "fc.weight": torch.zeros(10, 32)}
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        apply_patches(bad, [(p1, 1.0)])
    with pytest.raises(ValueError, match="no float tensor matches"):
        make_patch(t1, PatchConfig(layers=["head.*"]))
