"""weight_matching: the found permutations are symmetries of B and recover a known permutation."""

import pytest
import torch
from pydantic import ValidationError
from scipy.optimize import linear_sum_assignment

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.merge.weight_matching import (
    WeightMatchingConfig,
    align_and_merge,
    apply_permutation,
    assignment_gain,
    match_weights,
    permutation_spec,
)
from tasks.train.init import initialize

ARCHS = {  # digits as (1, 8, 8) images: two 2x pools leave 2x2, so the Flatten joins blocks of 4
    "mlp": MLPConfig(hidden=[32, 24]),
    "cnn": CNNConfig(channels=[8, 12], hidden=16),
    "cnn_no_fc": CNNConfig(channels=[6, 10], hidden=0),  # the head reads the flattened conv blocks
}
SHAPE = (1, 8, 8)


def _train(arch: str, seed: int, x, y):
    g = torch.Generator().manual_seed(seed)
    model = build_model(ARCHS[arch], SHAPE, 10)
    initialize(model, "kaiming", g)
    fit(model, x.view(-1, *SHAPE), y, FitConfig(optimizer="adamw", lr=3e-3, epochs=2, batch_size=64), g)
    return model


@pytest.fixture(scope="module")
def pairs(digits_split, one_thread):
    """{arch: (model A, model B)}: tiny digits classifiers from different seeds and batch orders."""
    x, y = digits_split[0][:600], digits_split[1][:600]
    return {arch: (_train(arch, 0, x, y), _train(arch, 1, x, y)) for arch in ARCHS}


def _matched(pair, seed=0):
    a, b = pair
    spec = permutation_spec(a)
    perms = match_weights(spec, a.state_dict(), b.state_dict(), 100, torch.Generator().manual_seed(seed))
    return spec, perms


def _inner(s, t, spec):
    return sum((s[k].double() * t[k].double()).sum().item() for k in spec.axes_to_perm)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_found_permutations_leave_b_unchanged_as_a_function(pairs, arch, digits_split):
    a, b = pairs[arch]
    spec, perms = _matched(pairs[arch])
    for p, idx in perms.items():
        assert torch.equal(idx.sort().values, torch.arange(spec.sizes[p])), f"{p} is not a permutation"
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in perms.values()), "nothing was permuted"
    aligned = build_model(ARCHS[arch], SHAPE, 10)
    aligned.load_state_dict(apply_permutation(spec, perms, b.state_dict()))
    x = digits_split[2].view(-1, *SHAPE)
    with torch.no_grad():
        diff = (aligned(x) - b(x)).abs().max().item()
    assert diff < 1e-5, f"max |logit difference| {diff:.2e}"
    # matching moved B towards A: the objective Σ⟨W_A, P(W_B)⟩ rose from the identity's
    assert _inner(a.state_dict(), aligned.state_dict(), spec) > _inner(a.state_dict(), b.state_dict(), spec)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_per_layer_singular_values_are_unchanged(pairs, arch):
    b = pairs[arch][1]
    spec, perms = _matched(pairs[arch])
    aligned = apply_permutation(spec, perms, b.state_dict())
    for name, w in b.state_dict().items():
        if w.dim() >= 2:
            before = torch.linalg.svdvals(w.flatten(1).double())
            after = torch.linalg.svdvals(aligned[name].flatten(1).double())
            torch.testing.assert_close(after, before, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matching_a_permuted_copy_recovers_the_inverse_permutation(pairs, arch):
    a = pairs[arch][0].state_dict()
    spec = permutation_spec(pairs[arch][0])
    g = torch.Generator().manual_seed(7)
    secret = {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}
    shuffled = apply_permutation(spec, secret, a)
    found = match_weights(spec, a, shuffled, 100, torch.Generator().manual_seed(0))
    for p in spec.sizes:
        assert torch.equal(found[p], torch.argsort(secret[p])), p
    back = apply_permutation(spec, found, shuffled)
    for name, w in a.items():
        assert torch.equal(back[name], w), name


def test_result_is_a_fixed_point_of_every_coordinate_step(pairs):
    """At convergence no single permutation's assignment can raise the objective (Algorithm 1's stop)."""
    a, b = pairs["cnn"]
    spec, perms = _matched(pairs["cnn"])
    for p in spec.sizes:
        gain = assignment_gain(spec, perms, p, a.state_dict(), b.state_dict())
        rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
        best = gain[rows, cols].sum().item()
        now = gain[torch.arange(len(perms[p])), perms[p]].sum().item()
        assert now >= best - 1e-9 * abs(best), f"{p}: {now} < {best}"


def test_same_seed_same_permutations_and_the_generator_orders_the_layers(pairs):
    a, b = (m.state_dict() for m in pairs["cnn"])
    spec = permutation_spec(pairs["cnn"][0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = match_weights(spec, a, b, 100, g1)
    second = match_weights(spec, a, b, 100, g2)
    assert all(torch.equal(first[p], second[p]) for p in first)
    assert not torch.equal(g1.get_state(), torch.Generator().manual_seed(3).get_state()), "generator unused"


def test_unsupported_model_names_the_module():
    vit = build_model(ViTConfig(width=16, depth=1, heads=2, mlp=16), (1, 28, 28), 10)
    with pytest.raises(ValueError, match="LayerNorm at 'backbone.blocks.0.norm1'") as info:
        permutation_spec(vit)
    assert "\n" not in str(info.value)


def test_align_and_merge_endpoints_and_a_permuted_copy(pairs):
    a, b = (m.state_dict() for m in pairs["mlp"])
    a["step"] = b["step"] = torch.tensor(3)  # a non-float buffer: kept from the first model
    b["step"] = torch.tensor(9)
    spec = permutation_spec(pairs["mlp"][0])
    g = torch.Generator().manual_seed(0)
    at0, _ = align_and_merge(spec, [a, b], WeightMatchingConfig(alpha=0.0), g)
    at1, perms = align_and_merge(spec, [a, b], WeightMatchingConfig(alpha=1.0), torch.Generator().manual_seed(0))
    assert all(torch.equal(at0[k], a[k]) for k in a)
    assert all(torch.equal(v, torch.arange(len(v))) for v in perms[0].values())  # the first model stays put
    expected = apply_permutation(spec, perms[1], b)
    assert all(torch.equal(at1[k], expected[k]) for k in a if k != "step") and at1["step"] == 3
    # A, a permuted copy of A and another: each copy aligns back onto A, so the mean is (2A + P(B)) / 3
    shuffled = apply_permutation(spec, {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}, a)
    merged, perms3 = align_and_merge(spec, [a, shuffled, b], WeightMatchingConfig(), g)
    aligned_b = apply_permutation(spec, perms3[2], b)
    for k in spec.axes_to_perm:
        torch.testing.assert_close(merged[k], (2 * a[k] + aligned_b[k]) / 3, atol=1e-6, rtol=0, msg=k)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        WeightMatchingConfig(alpha=1.5)
    with pytest.raises(ValidationError):
        WeightMatchingConfig(max_sweeps=0)
    with pytest.raises(ValidationError):
        WeightMatchingConfig(sweeps=3)
    with pytest.raises(ValueError, match="at least 2 models"):
        align_and_merge(permutation_spec(build_model(ARCHS["mlp"], SHAPE, 10)), [{}], WeightMatchingConfig(),
                        torch.Generator())
