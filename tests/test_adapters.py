"""Bring your own model: parametrisation adapters, flow matching, discrete-time tables."""
import numpy as np
import pytest
from autograd import elementwise_grad

import models
import scoreopt as so

FM = so.flow_matching()
PROCESSES = [pytest.param(so.ve(), id="ve"), pytest.param(so.vp_linear(), id="vp_linear"),
             pytest.param(FM, id="flow_matching")]
MIXTURE = models.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, 0.0]], [[0.2, 0.5], [0.4, 0.3]])


def posterior_mean(target, process, x, t):
    """E[x_0 | x_t = x] of a diagonal Gaussian mixture, written independently of its score:
    responsibilities times each component's posterior mean
    mu_k + s lam_k (x - s mu_k) / (s^2 lam_k + sigma^2)."""
    s, sigma = process.s(t), process.sigma(t)
    var = s ** 2 * target.stds ** 2 + sigma ** 2                                   # (K, d)
    diff = x[:, None, :] - s * target.means[None]
    log_r = np.log(target.weights) - 0.5 * np.sum(diff ** 2 / var + np.log(var), axis=2)
    r = np.exp(log_r - log_r.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)
    means = target.means[None] + s * target.stds[None] ** 2 * diff / var
    return np.sum(r[:, :, None] * means, axis=1)


def models_of(target, process):
    """The target as a denoiser, an eps-, a v- and a velocity-prediction model."""
    x0_hat = lambda x, t: posterior_mean(target, process, x, t)
    eps_hat = lambda x, t: (x - process.s(t) * x0_hat(x, t)) / process.sigma(t)
    ds, dsigma = elementwise_grad(process.s), elementwise_grad(process.sigma)
    return {
        "denoiser": lambda y, nu: x0_hat(process.s(t_of(process, nu)) * y, t_of(process, nu)),
        "eps": eps_hat,
        "v": lambda x, t: process.s(t) * eps_hat(x, t) - process.sigma(t) * x0_hat(x, t),
        "flow": lambda x, t: ds(t) * x0_hat(x, t) + dsigma(t) * eps_hat(x, t),
    }


def t_of(process, nu):
    return float(so.time_from_nsr(process, np.array([nu]))[0])


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("kind", ["denoiser", "eps", "v", "flow"])
def test_every_adapter_gives_the_exact_score_of_a_mixture(process, kind):
    adapter = {"denoiser": so.score_from_denoiser, "eps": so.score_from_eps, "v": so.score_from_v,
               "flow": so.score_from_flow}[kind]
    score = adapter(models_of(MIXTURE, process)[kind], process)
    for t in np.linspace(process.t_min, process.t_max, 7)[1:-1]:
        x = MIXTURE.marginal(process, t).sample(50, 0)
        np.testing.assert_allclose(score(x, t), MIXTURE.score(x, t, process), rtol=1e-7, atol=1e-9)


def test_flow_matching_is_the_straight_path_on_edms_noise_range():
    t = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(FM.s(t), 1 - t)
    np.testing.assert_allclose(FM.sigma(t), t)
    np.testing.assert_allclose(so.nsr(FM, [FM.t_min, FM.t_max]), [0.002, 80.0], rtol=1e-12)
    # Under flow matching the velocity is eps - x0, so S = -(x + (1 - t) u) / t.
    u = lambda x, t: np.ones_like(x)
    x = np.array([[0.3]])
    np.testing.assert_allclose(so.score_from_flow(u, FM)(x, 0.25), -(0.3 + 0.75) / 0.25)
    for T in (5, 20):
        so.check_schedule(so.edm_schedule(FM, T), FM)
    with pytest.raises(ValueError, match="0 < `t_min` < `t_max` < 1"):
        so.flow_matching(t_max=1.0)


def diffusers_linear_table(N=1000):
    """diffusers' DDPM "linear" betas: linspace(1e-4, 0.02, N), alphas_cumprod = cumprod(1 - beta)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, N))


def test_table_process_is_exact_at_the_table_and_monotone_between():
    abar = diffusers_linear_table()
    p = so.process_from_alphas_cumprod(abar)
    k = np.arange(1000)
    t = k / 999
    np.testing.assert_allclose(p.s(t) ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(p.sigma(t) ** 2, 1 - abar, rtol=1e-12)
    fine = np.linspace(0, 1, 20_001)
    assert np.all(np.diff(so.nsr(p, fine)) > 0)
    # Derivatives in t exist everywhere (autograd through the interpolation).
    assert np.all(np.isfinite(p.drift(fine[1:-1]))) and np.all(p.diffusion_sq(fine[1:-1]) > 0)


def test_continuous_vp_linear_differs_from_diffusers_discrete_linear_betas():
    # The README's warning: the discrete "linear" table and the continuous vp_linear
    # process (beta from 0.1 to 20) differ in nu by a few per cent at the usual
    # correspondence t = (k + 1) / N (measured: 4.9%, at k = 0).
    abar = diffusers_linear_table()
    t = (np.arange(1000) + 1) / 1000
    nu_table = np.sqrt((1 - abar) / abar)
    worst = np.max(np.abs(so.nsr(so.vp_linear(t_min=1e-6), t) / nu_table - 1))
    assert 0.03 < worst < 0.06


def test_to_timesteps_round_trips_table_times_in_descending_order():
    p = so.process_from_alphas_cumprod(diffusers_linear_table())
    k = np.array([0, 3, 50, 400, 999])
    np.testing.assert_array_equal(so.to_timesteps(p, k / 999), k[::-1])
    ts = so.loglinear_schedule(p, 25)
    steps = so.to_timesteps(p, ts)
    assert steps[0] == 999 and steps[-1] == 0 and np.all(np.diff(steps) < 0)
    with pytest.raises(ValueError, match="round to the same timestep"):
        so.to_timesteps(p, so.uniform_schedule(p, 1500))
    with pytest.raises(ValueError, match="discrete-time model"):
        so.to_timesteps(so.vp_linear(), so.uniform_schedule(so.vp_linear(), 5))


def test_merging_timesteps_removes_the_duplicates_and_says_how_many_steps_remain():
    p = so.process_from_alphas_cumprod(diffusers_linear_table(50))
    ts = so.uniform_schedule(p, 80)                 # 81 times on a 50-entry table
    with pytest.warns(RuntimeWarning, match="50 of 81 levels remain"):
        steps = so.to_timesteps(p, ts, merge=True)
    np.testing.assert_array_equal(steps, np.arange(50)[::-1])
    with pytest.raises(TypeError, match="`merge` must be True or False"):
        so.to_timesteps(p, ts, merge="no")


def test_adapters_and_tables_refuse_bad_input():
    with pytest.raises(TypeError, match="`denoiser` must be callable"):
        so.score_from_denoiser("model", so.ve())
    with pytest.raises(ValueError, match="strictly decreasing"):
        so.process_from_alphas_cumprod([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        so.process_from_alphas_cumprod([1.0, 0.5])
    with pytest.raises(ValueError, match="at least 2 values"):
        so.process_from_alphas_cumprod([0.5])


# --- Estimation on a budget, in parallel, saved and exported ------------------------

VP = so.vp_linear()
CANTOR = models.mollified_cantor()


def cantor_score(x, t):
    """Module level, so that a process pool can pickle it (by reference)."""
    return CANTOR.score(x, t, VP)


def test_a_budget_is_never_exceeded_and_is_reported():
    for budget in (5_000, 30_000, 100_000):
        smap = so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(50_000, 0), 1, budget=budget)
        calls = []
        counted = lambda x, t: calls.append(len(x)) or cantor_score(x, t)
        again = so.estimate_schedule_map(counted, VP, CANTOR.sample(50_000, 0), 1, budget=budget)
        assert smap.n_evaluations == sum(calls) == again.metadata["n_evaluations"] <= budget
        assert smap.n_evaluations > 0.9 * budget
        assert again.metadata["n_calls"] == len(calls)
    with pytest.raises(ValueError, match=r"needs at least 20 samples .*the budget allows"):
        so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(1000, 0), 1, budget=500)


def test_parallel_evaluation_gives_the_serial_result():
    from concurrent.futures import ThreadPoolExecutor
    x0 = CANTOR.sample(400, 0)
    serial = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=40)
    with ThreadPoolExecutor(2) as pool:
        threads = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=40, workers=pool.map)
    processes = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=40, workers=2)
    for other in (threads, processes):
        np.testing.assert_array_equal(other.delta, serial.delta)
        np.testing.assert_array_equal(other.Lambda_groups, serial.Lambda_groups)
        assert other.n_evaluations == serial.n_evaluations
    with pytest.raises(ValueError, match="`workers` must be"):
        so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=40, workers=0)


def test_the_gaussian_control_variate_keeps_the_mean_and_cuts_the_spread():
    # Same expectation (the control's mean is exact), lower variance at the noisy end.
    maps = {cv: [so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(500, s), 10 + s, n_grid=30,
                                          control_variate=cv) for s in range(12)] for cv in (False, True)}
    lengths = {cv: np.array([m.length for m in ms]) for cv, ms in maps.items()}
    se = np.sqrt(lengths[False].var(ddof=1) / 12 + lengths[True].var(ddof=1) / 12)
    assert abs(lengths[False].mean() - lengths[True].mean()) < 4.5 * se
    noisy_end = slice(20, 30)
    se_plain = np.mean([m.delta_stderr[noisy_end] / m.delta[noisy_end] for m in maps[False]])
    se_cv = np.mean([m.delta_stderr[noisy_end] / m.delta[noisy_end] for m in maps[True]])
    assert se_cv < 0.5 * se_plain


def test_a_schedule_map_round_trips_through_json(tmp_path):
    smap = so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(400, 0), 7, n_grid=50)
    path = tmp_path / "map.json"
    smap.save(str(path))
    back = so.load_schedule_map(str(path))
    for field in ("ts", "delta", "delta_stderr", "Lambda", "Lambda_groups"):
        np.testing.assert_array_equal(getattr(back, field), getattr(smap, field))
    assert back.length == smap.length and back.n_evaluations == smap.n_evaluations
    for key in ("process", "n_grid", "n_samples", "seed", "version", "created", "cost", "velocity"):
        assert back.metadata[key] == smap.metadata[key]
    assert back.metadata["seed"] == 7 and back.metadata["process"] == VP.name
    np.testing.assert_array_equal(back.schedule(20), smap.schedule(20))
    # Exported sigmas from the stored nu agree with the process's own conversion to the
    # resolution of the 50-level grid (two interpolations of the same map). In k-diffusion's
    # convention n levels and a 0: the levels of the (n - 1)-step schedule.
    np.testing.assert_allclose(back.sigmas(11), so.to_sigmas(VP, smap.schedule(10)), rtol=1e-3)
    assert len(back.sigmas(11)) == 12 and back.sigmas(11)[-1] == 0 and np.all(np.diff(back.sigmas(11)) < 0)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "not a readable schedule map"),
    (lambda text: text.replace('"format": "scoreopt.ScheduleMap/1"', '"format": "other"'), "format is 'other'"),
    (lambda text: text.replace('"length_stderr"', '"length_error"'), "missing field 'length_stderr'"),
    (lambda text: text.replace('"order": 2', '"order": -2'), r"`order` must be one of \(1, 2, 3, 4, 6, 8\)"),
])
def test_a_damaged_schedule_map_file_is_a_clear_error(tmp_path, damage, message):
    smap = so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(100, 0), 7, n_grid=20)
    path = tmp_path / "map.json"
    smap.save(str(path))
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=message):
        so.load_schedule_map(str(path))


def test_a_hand_edited_grid_or_length_is_refused(tmp_path):
    import json
    smap = so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(100, 0), 7, n_grid=20)
    path = tmp_path / "map.json"
    smap.save(str(path))
    data = json.loads(path.read_text())
    data["ts"][3], data["ts"][4] = data["ts"][4], data["ts"][3]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="strictly increasing"):
        so.load_schedule_map(str(path))
    data = json.loads(path.read_text())
    data["ts"][3], data["ts"][4] = data["ts"][4], data["ts"][3]
    data["length"] *= 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="`length` is not the end of `Lambda`"):
        so.load_schedule_map(str(path))
