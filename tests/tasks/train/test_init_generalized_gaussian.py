import math

import pytest
import torch
from scipy import stats

from tasks.train.init import initialize
from tasks.train.inits.generalized_gaussian import (
    excess_kurtosis,
    fit_beta,
    generalized_gaussian,
    sample_gamma,
)

W = torch.empty(1024, 1024)  # 1M weights: sample kurtosis of a Laplace has s.e. ≈ 0.05
KAIMING_VAR = 2 / 1024


def _draw(beta, seed=0):
    return generalized_gaussian(W, torch.Generator().manual_seed(seed), beta=beta).double()


def _excess_kurtosis(w):
    w = w - w.mean()
    return (w.pow(4).mean() / w.pow(2).mean() ** 2).item() - 3


@pytest.mark.parametrize("k", [0.1, 0.5, 1.0, 2.5, 10.0])
def test_gamma_sampler_is_gamma(k):
    x = sample_gamma(100_000, k, torch.Generator().manual_seed(1))
    assert torch.all(x > 0)
    assert stats.kstest(x.numpy(), stats.gamma(k).cdf).pvalue > 1e-3


def test_gamma_sampler_follows_the_generator():
    a = sample_gamma(1000, 0.7, torch.Generator().manual_seed(4))
    b = sample_gamma(1000, 0.7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0])
def test_variance_matches_kaiming(beta):
    w = _draw(beta)
    assert abs(w.var().item() / KAIMING_VAR - 1) < 0.03
    assert abs(w.mean().item()) < 3 * math.sqrt(KAIMING_VAR / W.numel()) * 2


@pytest.mark.parametrize("beta,expected,tol", [(1.0, 3.0, 0.25), (2.0, 0.0, 0.05), (3.0, -0.5818, 0.05)])
def test_excess_kurtosis(beta, expected, tol):
    assert excess_kurtosis(beta) == pytest.approx(expected, abs=1e-3)
    assert abs(_excess_kurtosis(_draw(beta)) - expected) < tol


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0])
def test_fitted_beta_recovers_the_shape(beta):
    assert abs(fit_beta(_draw(beta, seed=2)) - beta) < 0.2 * min(1.0, beta)


def test_laplace_at_beta_one():
    w = _draw(1.0).flatten().numpy()
    b = math.sqrt(KAIMING_VAR / 2)  # Laplace scale with Kaiming's variance
    assert stats.kstest(w[:200_000], stats.laplace(scale=b).cdf).pvalue > 1e-3


def test_through_initialize_on_a_conv_kernel():
    conv = torch.nn.Conv2d(64, 128, 3)
    initialize(conv, {"scheme": "generalized_gaussian", "beta": 1.0}, torch.Generator().manual_seed(0))
    var = 2 / (64 * 9)
    assert abs(conv.weight.double().var().item() / var - 1) < 0.03
    assert abs(_excess_kurtosis(conv.weight.double().flatten()) - 3.0) < 0.6
