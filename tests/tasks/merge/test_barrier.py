"""barrier: the loss/accuracy barrier definition, the interpolation path and the plot."""

import pytest
import torch

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.merge.barrier import (
    accuracy_barrier,
    classifier_evaluator,
    interpolation_curve,
    loss_barrier,
    plot_barrier,
)
from tasks.merge.weight_matching import apply_permutation, match_weights, permutation_spec
from tasks.train.init import initialize

ALPHAS = [i / 10 for i in range(11)]


def _curve(loss, acc=lambda a: 0.9):
    return [{"alpha": a, "loss": loss(a), "accuracy": acc(a)} for a in ALPHAS]


def test_linear_in_alpha_has_zero_barrier():
    curve = _curve(lambda a: 1.0 + 2.0 * a, lambda a: 0.8 + 0.1 * a)  # unequal endpoints
    assert loss_barrier(curve) == pytest.approx(0.0, abs=1e-12)
    assert accuracy_barrier(curve) == pytest.approx(0.0, abs=1e-12)


def test_a_bump_gives_its_height_above_the_endpoint_line():
    # endpoints 1 and 3, bump of 0.5 at α = 0.3 where the line is at 1.6: not max(L) − max(L(0), L(1))
    curve = _curve(lambda a: 1.0 + 2.0 * a + (0.5 if a == 0.3 else 0.0),
                   lambda a: 0.9 - (0.25 * 4 * a * (1 - a)))  # accuracy dips by 0.25 at α = 0.5
    assert loss_barrier(curve) == pytest.approx(0.5)
    assert accuracy_barrier(curve) == pytest.approx(0.25)


def test_a_curve_without_both_endpoints_is_refused():
    with pytest.raises(ValueError, match="alpha 0 and 1"):
        loss_barrier(_curve(lambda a: a)[:-1])


def test_interpolation_curve_walks_the_straight_line_and_keeps_int_buffers_of_a():
    a = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    seen = []

    def evaluate(state):
        seen.append(state)
        return state["w"].sum().item(), float(state["n"])

    curve = interpolation_curve(a, b, evaluate, [0.0, 0.25, 1.0])
    assert [p["loss"] for p in curve] == [-1.0, 1.5, 9.0]  # (1 − α)·(−1) + α·9
    assert torch.equal(seen[0]["w"], a["w"]) and torch.equal(seen[-1]["w"], b["w"])
    assert all(p["accuracy"] == 4.0 for p in curve)


def test_classifier_evaluator_endpoints_are_the_models(digits_split):
    x, y = digits_split[2], digits_split[3]
    a, b = build_model(MLPConfig(hidden=[16]), (64,), 10), build_model(MLPConfig(hidden=[16]), (64,), 10)
    curve = interpolation_curve(a.state_dict(), b.state_dict(), classifier_evaluator(a, x, y), [0.0, 1.0])
    with torch.no_grad():
        logits = b(x)  # (597, 10)
    assert curve[1]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert curve[1]["accuracy"] == (logits.argmax(1) == y).sum().item() / len(y)


def test_plot_writes_only_the_png(tmp_path):
    path = tmp_path / "barrier.png"
    plot_barrier({"naive": _curve(lambda a: 1 + a * (1 - a)), "aligned": _curve(lambda a: 1.0)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["barrier.png"]


def _train(seed, x, y):
    g = torch.Generator().manual_seed(seed)
    model = build_model(MLPConfig(hidden=[128, 128]), (64,), 10)
    initialize(model, "kaiming", g)
    fit(model, x, y, FitConfig(optimizer="adamw", lr=2e-3, epochs=10, batch_size=64), g)
    return model


def test_matching_lowers_the_barrier_between_independent_models(digits_split, one_thread):
    """Git Re-Basin's claim at toy scale: digits MLPs from two seeds, barrier before vs after matching."""
    x, y, xt, yt = digits_split
    a, b = _train(0, x, y), _train(1, x, y)
    spec = permutation_spec(a)
    perms = match_weights(spec, a.state_dict(), b.state_dict(), 100, torch.Generator().manual_seed(0))
    evaluate = classifier_evaluator(build_model(MLPConfig(hidden=[128, 128]), (64,), 10), xt, yt)
    naive = loss_barrier(interpolation_curve(a.state_dict(), b.state_dict(), evaluate, ALPHAS))
    aligned = loss_barrier(interpolation_curve(a.state_dict(), apply_permutation(spec, perms, b.state_dict()),
                                               evaluate, ALPHAS))
    assert aligned < 0.5 * naive, f"barrier {naive:.4f} before matching, {aligned:.4f} after"
