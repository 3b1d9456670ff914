import copy
import itertools
import json

import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits

from slimforge.models import CNNConfig, MLPConfig, build_model
from slimforge.training import FitConfig, accuracy, fit
from tasks.prune.common import PruneContext
from tasks.prune.layer_adaptive import (
    LayerAdaptiveConfig,
    allocate,
    calibration_batch,
    interpolated_distortion,
    joint_distortion,
    knapsack,
    layer_adaptive_masks,
    layer_distortions,
    prune_layer_adaptive,
    pruned_counts,
    sparsity_grid,
)
from tasks.prune.magnitude import magnitude_masks, prunable
from tasks.train.init import initialize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _convex_table(num_layers, num_grid, g):
    """(L, G) increasing convex curves from 0, like real distortion-vs-sparsity curves."""
    steps = torch.rand(num_layers, num_grid - 1, generator=g, dtype=torch.float64).sort(dim=1).values
    scale = torch.rand(num_layers, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    return torch.cat([torch.zeros(num_layers, 1, dtype=torch.float64), (steps * scale).cumsum(1)], dim=1)


def _brute_force(cost, units, budget):
    best = float("inf")
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        if sum(int(units[l, c]) for l, c in enumerate(choice)) >= budget:
            best = min(best, sum(float(cost[l, c]) for l, c in enumerate(choice)))
    return best


def test_knapsack_equals_brute_force_on_three_layers():
    g = _gen(0)
    for trial in range(80):
        # arbitrary (also non-monotone) costs and unit counts: the DP must be exact regardless
        cost = torch.rand(3, 5, generator=g, dtype=torch.float64)
        units = torch.randint(0, 7, (3, 5), generator=g).sort(dim=1).values
        budget = int(torch.randint(0, int(units.max(1).values.sum()) + 1, (1,), generator=g))
        choice = knapsack(cost, units, budget)
        assert sum(int(units[l, c]) for l, c in enumerate(choice)) >= budget, trial
        value = sum(float(cost[l, c]) for l, c in enumerate(choice))
        assert value == pytest.approx(_brute_force(cost, units, budget), abs=1e-12), trial


def test_knapsack_rejects_an_unreachable_budget():
    with pytest.raises(ValueError, match="prune.sparsity"):
        knapsack(torch.zeros(2, 3), torch.tensor([[0, 1, 2], [0, 1, 2]]), 5)


def test_allocate_matches_brute_force_over_real_counts_when_units_are_exact():
    # sizes and grid chosen so every grid count is a multiple of the 10-weight unit: the DP's
    # feasible set is then exactly {Σ real pruned >= target}, and brute force over real counts
    # is the ground truth.
    sizes, grid = [100, 150, 250], torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    counts = pruned_counts(sizes, grid)
    assert torch.all(counts % 10 == 0)
    g = _gen(1)
    for sparsity in (0.2, 0.4, 0.6, 0.7):
        table = _convex_table(3, 5, g)
        target = round(sparsity * 500)
        alloc = allocate(table, sizes, grid, sparsity, unit=0.02)
        pruned = [round(float(s) * n) for s, n in zip(alloc, sizes)]
        assert sum(pruned) == target
        best = _brute_force(table, counts, target)
        assert interpolated_distortion(table, sizes, grid, alloc) <= best + 1e-12


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8, 0.9, 0.97])
def test_budget_is_met_exactly_on_awkward_sizes(sparsity):
    sizes = [37, 1000, 555, 12, 4096]
    grid = sparsity_grid(0.02)
    table = _convex_table(len(sizes), len(grid), _gen(2))
    alloc = allocate(table, sizes, grid, sparsity, unit=0.01)
    total = sum(sizes)
    pruned = [round(float(s) * n) for s, n in zip(alloc, sizes)]
    assert sum(pruned) == total - round((1 - sparsity) * total)
    assert all(0 <= s <= 0.99 + 1e-12 for s in alloc.tolist())


def test_allocation_beats_uniform_on_convex_curves():
    # uniform at a grid point whose counts are whole units is a feasible DP answer, so the DP's
    # optimum can only be lower (strictly, when the layers' curves differ)
    sizes, grid = [100, 200, 300, 400], sparsity_grid(0.1)
    g = _gen(3)
    for sparsity in (0.3, 0.5, 0.8):
        table = _convex_table(4, len(grid), g)
        alloc = allocate(table, sizes, grid, sparsity, unit=0.01)
        uniform = torch.full((4,), sparsity, dtype=torch.float64)
        assert interpolated_distortion(table, sizes, grid, alloc) < interpolated_distortion(table, sizes, grid, uniform)


@pytest.fixture(scope="module")
def trained():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16  # (1797, 64)
    y = torch.tensor(digits.target)
    g = _gen(0)
    model = build_model(MLPConfig(hidden=[32, 16]), (64,), 10)
    initialize(model, "kaiming", g)
    fit(model, x[:1400], y[:1400], FitConfig(epochs=10, lr=2e-2, batch_size=256), g, label="fixture")
    assert accuracy(model, x[1400:], y[1400:]) > 0.8
    return model, calibration_batch(x[:1400], 128, g), x[:1400]


def test_layer_distortions_isolate_one_layer_and_leave_the_model_intact(trained):
    model, xc, _ = trained
    before = {n: p.clone() for n, p in model.state_dict().items()}
    grid = sparsity_grid(0.1)
    table = layer_distortions(model, xc, grid)
    weights = prunable(model)
    assert table.shape == (len(weights), len(grid))
    assert torch.all(table[:, 0] == 0)
    assert torch.all(table[:, -1] > table[:, 1])
    name = list(weights)[1]
    single = joint_distortion(model, xc, magnitude_masks({name: weights[name]}, float(grid[5]), "layer"))
    assert table[1, 5].item() == pytest.approx(single, rel=1e-9)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_masks_report_and_comparison_with_uniform(trained):
    model, xc, _ = trained
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cfg = LayerAdaptiveConfig(sparsity=0.7, grid_step=0.05)
    masks, report = layer_adaptive_masks(model, xc, cfg)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)  # same count as magnitude
    assert report["sparsity"] == pytest.approx(1 - round(0.3 * total) / total)
    # each mask is the layer's own magnitude mask at the allocated sparsity
    for name, w in weights.items():
        s = report["layer_sparsity"][name]
        assert torch.equal(masks[name], magnitude_masks({name: w}, s, "layer")[name]), name
        if 0 < s < 1:
            assert w.abs()[masks[name]].min() >= w.abs()[~masks[name]].max(), name
    assert len(set(report["layer_sparsity"].values())) > 1  # not secretly uniform
    assert report["predicted_distortion"] <= report["uniform_predicted_distortion"]
    assert report["measured_distortion"] > 0
    ratio = report["measured_distortion"] / report["predicted_distortion"]
    assert 0.3 < ratio < 3, f"additivity ratio {ratio:.3f}"
    assert set(report["layer_distortions"]) == set(weights)
    assert len(report["grid"]) == len(sparsity_grid(0.05))


def test_conv_layers_are_allocated_too():
    model = build_model(CNNConfig(channels=[4, 8], hidden=16), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(0))
    x = torch.rand(32, 1, 8, 8, generator=_gen(1))
    masks, _ = layer_adaptive_masks(model, x, LayerAdaptiveConfig(sparsity=0.5, grid_step=0.1))
    assert set(masks) == set(prunable(model)) and "backbone.body.0.weight" in masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)


def test_grid_calibration_and_config():
    grid = sparsity_grid(0.02)
    assert len(grid) == 51 and grid[0] == 0 and grid[-1] == 0.99 and grid[-2] == pytest.approx(0.98)
    x = torch.arange(100.0)[:, None]
    a, b = calibration_batch(x, 10, _gen(5)), calibration_batch(x, 10, _gen(5))
    assert torch.equal(a, b) and len(a.unique()) == 10
    assert not torch.equal(a, calibration_batch(x, 10, _gen(6)))
    with pytest.raises(ValidationError):
        LayerAdaptiveConfig(sparsity=0.995)
    with pytest.raises(ValidationError):
        LayerAdaptiveConfig(scope="global")


def test_registry_entry_applies_masks_and_reports_json(trained):
    model, _, x = trained
    model = copy.deepcopy(model)
    ctx = PruneContext(model=model, model_config=MLPConfig(hidden=[32, 16]), input_shape=(64,), num_classes=10,
                       x=x, y=torch.zeros(len(x), dtype=torch.long), generator=_gen(9))
    cfg = LayerAdaptiveConfig(sparsity=0.6, grid_step=0.1, calibration_size=64, seed=3)
    out = prune_layer_adaptive(ctx, cfg)
    masks, _ = layer_adaptive_masks(copy.deepcopy(out.model), calibration_batch(x, 64, _gen(3)), cfg)
    for name, w in prunable(out.model).items():
        assert torch.all(w[~out.masks[name]] == 0), name
    assert json.loads(json.dumps(out.report))["predicted_distortion"] >= 0
    assert set(out.report["layer_sparsity"]) == set(masks)
