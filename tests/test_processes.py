"""Processes, noise-level conversions and baseline schedules."""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import elementwise_grad
from hypothesis import given, strategies as st

import scoreopt as so
from strategies import PROCESSES, processes, steps


def test_vp_linear_sde_coefficients_match_beta():
    # For a VP process with rate beta(t): f = -beta/2 and g^2 = beta (Song et al. 2021).
    p = so.vp_linear(beta_min=0.1, beta_max=20.0)
    t = np.linspace(p.t_min, 1.0, 50)
    beta = 0.1 + t * 19.9
    np.testing.assert_allclose(p.drift(t), -beta / 2, rtol=1e-10)
    np.testing.assert_allclose(p.diffusion_sq(t), beta, rtol=1e-8)


def test_ve_sde_coefficients():
    # s = 1 so f = 0 and g^2 = d sigma^2 / dt = 2 log(sigma_max/sigma_min) sigma^2.
    p = so.ve(0.002, 80.0)
    t = np.linspace(0, 1, 30)
    np.testing.assert_allclose(p.drift(t), 0.0, atol=0)
    np.testing.assert_allclose(p.diffusion_sq(t), 2 * np.log(80 / 0.002) * p.sigma(t) ** 2, rtol=1e-12)


def test_vp_cosine_is_variance_preserving_with_beta_from_alpha_bar():
    p = so.vp_cosine()
    t = np.linspace(p.t_min, p.t_max, 40)
    np.testing.assert_allclose(p.s(t) ** 2 + p.sigma(t) ** 2, 1.0, rtol=1e-12)
    log_alpha_bar = lambda t: 2 * anp.log(p.s(t))
    beta = -elementwise_grad(log_alpha_bar)(t)
    np.testing.assert_allclose(p.diffusion_sq(t), beta, rtol=1e-8)
    np.testing.assert_allclose(p.s(0.0), 1.0, rtol=1e-14)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_coefficients_are_differentiable_in_t(name):
    # Second derivatives exist (autograd) and agree with a finite difference.
    p = PROCESSES[name]
    t = 0.5 * (p.t_min + p.t_max)
    h = 1e-5
    dg = elementwise_grad(p.diffusion_sq)(t)
    np.testing.assert_allclose(dg, (p.diffusion_sq(t + h) - p.diffusion_sq(t - h)) / (2 * h), rtol=1e-5)


@given(processes, st.floats(0.0, 1.0))
def test_time_from_nsr_inverts_nsr(p, u):
    t = p.t_min + u * (p.t_max - p.t_min)
    t_back = so.time_from_nsr(p, so.nsr(p, t))
    assert abs(t_back - t) <= 1e-12 * max(1.0, abs(t)) + 1e-13


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_time_from_nsr_is_monotone_and_exact_at_endpoints(name):
    p = PROCESSES[name]
    nu = so.nsr(p, np.array([p.t_min, p.t_max]))
    t = so.time_from_nsr(p, np.geomspace(nu[0], nu[1], 2001))
    assert t[0] == p.t_min and t[-1] == p.t_max
    assert np.all(np.diff(t) > 0)
    assert np.all(np.diff(so.nsr(p, so.uniform_schedule(p, 100))) > 0)


def test_to_sigmas_is_descending_with_trailing_zero():
    p = so.ve()
    ts = so.uniform_schedule(p, 10)
    sig = so.to_sigmas(p, ts)
    assert sig.shape == (12,) and sig[-1] == 0.0
    np.testing.assert_allclose(sig[:-1], p.sigma(ts)[::-1])
    assert np.all(np.diff(sig) < 0)


BASELINES = {
    "uniform": so.uniform_schedule,
    "cosine": so.cosine_schedule,
    "loglinear": so.loglinear_schedule,
    "edm3": lambda p, T: so.edm_schedule(p, T, rho=3.0),
    "edm7": so.edm_schedule,
    "edm100": lambda p, T: so.edm_schedule(p, T, rho=100.0),
    "arctan": lambda p, T: so.arctan_schedule(p, T, c=0.5),
}


@given(processes, steps, st.sampled_from(sorted(BASELINES)))
def test_baselines_are_valid_schedules(p, T, name):
    ts = BASELINES[name](p, T)
    assert ts.dtype == np.float64 and ts.shape == (T + 1,)
    assert ts[0] == p.t_min and ts[-1] == p.t_max
    assert np.all(np.diff(ts) > 0)
    so.check_schedule(ts, p)


def test_edm_schedule_follows_eq_22():
    p, T, rho = so.vp_linear(), 12, 7.0
    nu_min, nu_max = so.nsr(p, np.array([p.t_min, p.t_max]))
    i = np.arange(T + 1)
    expect = (nu_max ** (1 / rho) + i / T * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho
    np.testing.assert_allclose(so.nsr(p, so.edm_schedule(p, T, rho))[::-1], expect, rtol=1e-10)


def test_loglinear_and_arctan_have_equal_increments():
    p = so.vp_linear()
    nu = so.nsr(p, so.loglinear_schedule(p, 17))
    np.testing.assert_allclose(np.diff(np.log(nu)), np.log(nu[-1] / nu[0]) / 17, rtol=1e-9)
    nu = so.nsr(p, so.arctan_schedule(p, 17, c=0.7))
    inc = np.diff(np.arctan(nu / 0.7))
    np.testing.assert_allclose(inc, inc.mean(), rtol=1e-8)


def test_loglinear_is_uniform_for_geometric_ve():
    p = so.ve()
    np.testing.assert_allclose(so.loglinear_schedule(p, 25), so.uniform_schedule(p, 25), atol=1e-13)


def test_cosine_schedule_is_uniform_for_vp_cosine():
    p = so.vp_cosine()
    np.testing.assert_allclose(so.cosine_schedule(p, 30), so.uniform_schedule(p, 30), atol=1e-12)
