"""MLP score models, DSM training with the online schedule, checkpoints (docs/derivations.md, sections 4 and 10)."""
import os

import numpy as np
import pytest
from scipy.integrate import trapezoid
from autograd import value_and_grad
from autograd.misc import flatten
from autograd.test_util import check_grads

import models
import sampler as sm
import scoreopt as so
from oracles import gaussian_corrector_cost

VP = so.vp_linear()
BIMODAL = models.bimodal()
TS = so.uniform_schedule(VP, 30)


def small_params(seed=0, width=16, depth=2, dim=1):
    params = models.init_mlp(seed, dim=dim, width=width, depth=depth, n_fourier=2)
    rng = np.random.default_rng(seed + 1)      # a non-zero output layer, so gradients are generic
    W, b = params[-1]
    return params[:-1] + [(0.1 * rng.standard_normal(W.shape), 0.1 * rng.standard_normal(b.shape))]


def assert_same_params(a, b):
    for (Wa, ba), (Wb, bb) in zip(a, b):
        np.testing.assert_array_equal(Wa, Wb)
        np.testing.assert_array_equal(ba, bb)


def fresh_state(params, data_mean, data_var, seed, ts=TS):
    """A run at step 0 whose model is standardised with the given moments: ``train`` continues a
    TrainingState as it is (a fresh run takes its moments from the data)."""
    T = len(ts) - 1
    empty = {"loss": np.zeros(0), "update_step": np.zeros(0, int), "Lambda": np.zeros(0),
             "schedules": np.zeros((0, T + 1)), "costs": np.zeros((0, T))}
    dim = params[-1][0].shape[1]
    return models.TrainingState(params, ts, models.adam_init(flatten(params)[0]), 0, np.random.default_rng(seed),
                                empty, np.full(dim, data_mean), np.full(dim, data_var))


def score_error(model, target):
    exact = lambda x, t: target.score(x, t, VP)
    return sm.score_error(model, exact, VP, TS, target.sample(2000, 9), 10)[0]


def test_loss_gradient_matches_finite_differences():
    params = small_params()
    x0, rng = BIMODAL.sample(64, 0), np.random.default_rng(1)
    t, eps = models.schedule_levels(TS, 64, rng, VP), rng.standard_normal((64, 1))
    for preconditioning in ("edm", "eps"):
        batch = models.prepare_dsm(params, x0, t, eps, VP, 0.1, 0.5, preconditioning)
        check_grads(lambda p: models.prepared_dsm_loss(p, batch), modes=["rev"], order=1)(params)


def test_score_is_differentiable_in_x_and_t_to_second_order():
    params = small_params(dim=2)
    x = np.random.default_rng(0).standard_normal((5, 2))
    check_grads(lambda y: models.mlp_score(params, y, 0.3, VP), modes=["rev"], order=2)(x)
    check_grads(lambda t: models.mlp_score(params, x, t, VP), modes=["fwd", "rev"], order=1)(0.3)


@pytest.mark.parametrize("preconditioning", ["edm", "eps"])
def test_initial_model_is_the_gaussian_fit_and_per_row_times_agree(preconditioning):
    # Zero output layer: D = mean + c_skip (y - mean), the exact denoiser of N(data_mean, data_var).
    gauss = models.Gaussian([0.5, -1.0], [0.3, 2.0])
    params = models.init_mlp(0, dim=2)
    x = gauss.marginal(VP, 0.3).sample(6, 0)
    np.testing.assert_allclose(models.mlp_score(params, x, 0.3, VP, gauss.mean(), gauss.variance(), preconditioning),
                               gauss.score(x, 0.3, VP), rtol=1e-12)
    # ... so its loss is the Gaussian optimum: the DSM loss ||sigma S + eps||^2 is
    # E_t sum_k s^2 lam_k / (s^2 lam_k + sigma^2) for either parametrisation (the same denoiser).
    x0 = gauss.sample(40_000, 1)
    s, sig = VP.s(TS)[:, None], VP.sigma(TS)[:, None]
    dsm_optimum = np.mean(np.sum(s ** 2 * gauss.var / (s ** 2 * gauss.var + sig ** 2), axis=1))
    loss = models.dsm_loss(params, x0, VP, TS, 2, data_mean=gauss.mean(), data_var=gauss.variance(),
                           preconditioning=preconditioning)
    assert loss == pytest.approx(dsm_optimum, rel=0.03)
    p = small_params(dim=2)
    np.testing.assert_allclose(models.mlp_score(p, x[:4], np.full(4, 0.37), VP),
                               models.mlp_score(p, x[:4], 0.37, VP), rtol=1e-14)


@pytest.mark.parametrize("target", [models.Gaussian([0.5], [0.3]), BIMODAL], ids=["gaussian", "bimodal"])
def test_training_reduces_score_error(target):
    # The initial model is the Gaussian fit of its standardisation, exact for Gaussian
    # data: standardise with mean 0 and variance 1 instead (a run continued from a state
    # that has them), so that it starts wrong.
    params = models.init_mlp(0, dim=1, width=32, depth=2)
    before = score_error(models.score_model(params, VP, 0.0, 1.0), target)
    out = models.train(fresh_state(params, 0.0, 1.0, 1), target, VP, TS, rng=1, n_steps=1500, batch_size=128,
                       lr=3e-3, callback=None)
    after = score_error(out.score(VP), target)
    assert after < 0.05 * before
    assert out.step == 1500 and len(out.history["loss"]) == 1500


def test_same_seed_same_parameters_and_another_seed_others():
    runs = [models.train(small_params(), BIMODAL, VP, TS, rng=seed, n_steps=50, batch_size=32, callback=None)
            for seed in (4, 4, 5)]
    assert_same_params(runs[0].params, runs[1].params)
    assert not np.array_equal(runs[0].params[-1][0], runs[2].params[-1][0])


def test_preconditioning_is_edms_in_the_process_coordinates():
    # VE (s = 1, nu = sigma): Karras et al. 2022, Table 1, with sigma_data^2 = v.
    sigma, v = np.array([0.01, 0.5, 80.0]), 0.25
    c_skip, c_out, c_in = models.preconditioning_coefficients(sigma, v, "edm")
    np.testing.assert_allclose(c_skip, v / (sigma ** 2 + v), rtol=1e-14)
    np.testing.assert_allclose(c_out, sigma * np.sqrt(v) / np.sqrt(sigma ** 2 + v), rtol=1e-14)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma ** 2 + v), rtol=1e-14)
    assert np.all(c_out <= np.minimum(sigma, np.sqrt(v)))
    # Noise prediction differs only in c_out = -nu.
    eps = models.preconditioning_coefficients(sigma, v, "eps")
    np.testing.assert_array_equal(eps[0], c_skip)
    np.testing.assert_array_equal(eps[1], -sigma)
    # The VP counterpart: the same model in y = x/s. A VP score at (x, t) equals the VE score
    # (of the same parameters, on a VE process with VP's noise range) at (x/s, t'), divided by
    # s, where sigma_VE(t') = nu_VP(t).
    nu_lo, nu_hi = so.nsr(VP, [VP.t_min, VP.t_max])
    ve = so.ve(nu_lo, nu_hi)
    params = small_params(dim=2)
    mean, var = np.array([0.3, -0.2]), np.array([0.5, 1.5])
    for t in (0.05, 0.4, 0.9):
        x = np.random.default_rng(0).standard_normal((4, 2))
        s, nu = VP.s(t), VP.nsr(t)
        t_ve = float(so.time_from_nsr(ve, [nu])[0])
        np.testing.assert_allclose(models.mlp_score(params, x, t, VP, mean, var),
                                   models.mlp_score(params, x / s, t_ve, ve, mean, var) / s, rtol=1e-9)


def test_edm_targets_have_unit_variance_at_every_level():
    # tau = (x0 - m - c_skip (y - m)) / c_out has variance [(1 - c_skip)^2 v + c_skip^2 nu^2] / c_out^2
    # = 1 for any data of variance v (docs/derivations.md section 10): here the bimodal target,
    # far from Gaussian. 40,000 samples per level: the sample variance's s.e. is about
    # sqrt(2/n) * (kurtosis factor) < 0.02.
    params = models.init_mlp(0, dim=1)
    for t in (VP.t_min, 0.05, 0.3, 1.0):
        x0 = BIMODAL.sample(40_000, 1)
        eps = np.random.default_rng(2).standard_normal(x0.shape)
        batch = models.prepare_dsm(params, x0, np.full(len(x0), t), eps, VP, BIMODAL.mean(), BIMODAL.variance())
        assert batch.target.mean() == pytest.approx(0.0, abs=0.03)
        assert batch.target.var() == pytest.approx(1.0, abs=0.04)
        np.testing.assert_allclose(batch.weight, np.broadcast_to(BIMODAL.variance() / (BIMODAL.variance() + VP.nsr(t) ** 2), x0.shape))


def test_a_constant_coordinate_is_exact_and_left_out_of_the_loss():
    # Variance 0: c_out = 0, the denoiser is the mean, so the score is -(y - m)/nu^2 / s exactly,
    # whatever the network; the loss weight of that coordinate is 0.
    params = small_params(dim=2)
    x = np.random.default_rng(0).standard_normal((5, 2))
    mean, var = np.array([0.4, 0.0]), np.array([1.0, 0.0])
    score = models.mlp_score(params, x, 0.3, VP, mean, var)
    s, nu = VP.s(0.3), VP.nsr(0.3)
    np.testing.assert_allclose(score[:, 1], -(x[:, 1] / s - mean[1]) / nu ** 2 / s, rtol=1e-12)
    batch = models.prepare_dsm(params, np.tile(mean, (5, 1)), np.full(5, 0.3), x, VP, mean, var)
    assert np.all(batch.weight[:, 1] == 0) and np.all(np.isfinite(batch.target))


def test_score_error_by_level_is_the_direct_computation():
    model = models.train(small_params(), BIMODAL, VP, TS, rng=1, n_steps=20, batch_size=32).score(VP)
    exact = lambda x, t: BIMODAL.score(x, t, VP)
    ts, x0 = TS[::10], BIMODAL.sample(300, 3)
    report = sm.score_error_by_level(model, exact, VP, ts, x0, 4)
    rng = np.random.default_rng(4)
    for i, t in enumerate(ts):
        x = VP.s(t) * x0 + VP.sigma(t) * rng.standard_normal(x0.shape)
        diff2 = np.sum((model(x, t) - exact(x, t)) ** 2, axis=1)
        assert report.score_error[i] == pytest.approx(np.mean(VP.sigma(t) ** 2 * diff2), rel=1e-12)
        assert report.denoiser_error[i] == pytest.approx(np.mean((VP.sigma(t) ** 2 / VP.s(t)) ** 2 * diff2), rel=1e-12)
        assert report.score_stderr[i] == pytest.approx(np.std(VP.sigma(t) ** 2 * diff2, ddof=1) / np.sqrt(300), rel=1e-10)
    np.testing.assert_allclose(report.nu, VP.nsr(ts))
    overall = sm.score_error(model, exact, VP, ts, x0, 4)
    assert overall.value == pytest.approx(report.score_error.mean(), rel=1e-12)


def train_online(online):
    """1,600 steps on the bimodal target from the uniform 10-step schedule, checking
    that every schedule seen by the callback is valid."""
    def check(step, n_steps, info):
        so.check_schedule(info["ts"], VP)
    return models.train(models.init_mlp(0, width=32, depth=2), BIMODAL, VP, so.uniform_schedule(VP, 10), rng=2,
                        n_steps=1600, batch_size=128, lr=3e-3, online=online, callback=check)


def test_online_update_equalises_costs_and_keeps_schedules_valid():
    out = train_online(models.OnlineSchedule(every=25, burn_in=600, gamma=0.2, cost="corrector", n_samples=500,
                                             route="intervals"))
    costs = out.history["costs"]
    assert len(costs) == 41 and out.history["schedules"].shape == (41, 11)
    spread = costs.max(axis=1) / costs.min(axis=1)
    assert spread[0] > 100 and spread[-5:].max() < 0.05 * spread[0]
    # History holds the schedule *before* each update: the first is the starting one,
    # and the last update's blend is applied after it was recorded.
    np.testing.assert_array_equal(out.history["schedules"][0], so.uniform_schedule(VP, 10))
    assert np.abs(out.ts - out.history["schedules"][-1]).max() > 0
    np.testing.assert_array_equal(out.history["update_step"], 600 + 25 * np.arange(41))


@pytest.mark.parametrize("method", ["intervals", "grid"])
def test_online_update_is_algorithm_2_on_the_gaussian_closed_form(method):
    # Exact score of N(0, 0.5^2) data: the interval costs (closed form, docs/derivations.md section 1), the
    # Algorithm 1 target from them and the dense-grid target from the exact delta are
    # known, and the Monte-Carlo update must find them.
    g, ts, gamma = models.Gaussian([0.0], [0.25]), so.uniform_schedule(VP, 10), 0.3
    up = so.online_update(lambda x, t: g.score(x, t, VP), VP, ts, g.sample(20_000, 0), 1, gamma=gamma, route=method)
    np.testing.assert_allclose(up.ts, so.blend(ts, up.ts_star, gamma), rtol=0, atol=0)
    grid = so.loglinear_schedule(VP, 4000)
    delta = so.gaussian_local_cost(VP, grid, [0.25])
    if method == "intervals":
        exact = gaussian_corrector_cost(VP, ts[1:], ts[:-1], [0.25])
        np.testing.assert_allclose(up.costs, exact, rtol=0.05)
        np.testing.assert_allclose(up.ts_star, so.update_schedule(ts, exact), atol=2e-3)
        assert up.length == pytest.approx(so.path_length(exact), rel=0.02)
    else:
        Lambda = so.cumulative_cost(grid, delta)
        np.testing.assert_allclose(up.ts_star, so.optimal_schedule(grid, delta, 10), atol=2e-3)
        np.testing.assert_allclose(up.costs, np.diff(np.interp(ts, grid, Lambda)) ** 2, rtol=0.05, atol=1e-6)
        assert up.length == pytest.approx(Lambda[-1], rel=0.02)


def test_online_grid_update_moves_towards_the_dense_grid_optimum():
    out = train_online(models.OnlineSchedule(every=100, burn_in=600, gamma=0.3, route="grid",
                                             n_samples=500, n_grid=100))
    # Per-interval shares of the map's length: far from equal on the uniform schedule,
    # close to equal at the end.
    costs = out.history["costs"]
    assert costs[0].max() / costs[0].min() > 100 and costs[-1].max() / costs[-1].min() < 3
    exact_map = so.estimate_schedule_map(lambda x, t: BIMODAL.score(x, t, VP), VP, BIMODAL.sample(2000, 0), 1)
    start = np.abs(so.uniform_schedule(VP, 10) - exact_map.schedule(10)).max()
    assert np.abs(out.ts - exact_map.schedule(10)).max() < 0.3 * start


def test_small_gamma_moves_the_schedule_little_but_the_same_way():
    # Every update moves a time by at most gamma times the range (blend is convex); the
    # small steps still go where a large-gamma run goes, so gamma damps, not redirects.
    runs = {}
    for gamma in (0.01, 0.5):
        online = models.OnlineSchedule(every=10, burn_in=20, gamma=gamma, n_samples=200)
        runs[gamma] = models.train(small_params(), BIMODAL, VP, so.uniform_schedule(VP, 8), rng=3,
                                   n_steps=60, batch_size=32, online=online, callback=None)
    sched = np.vstack([runs[0.01].history["schedules"], runs[0.01].ts])
    assert np.max(np.abs(np.diff(sched, axis=0))) <= 0.01 * (VP.t_max - VP.t_min)
    small, large = (runs[g].ts[1:-1] - sched[0, 1:-1] for g in (0.01, 0.5))
    moved = np.abs(large) > 0.01
    assert moved.sum() >= 3 and np.all(np.sign(small[moved]) == np.sign(large[moved]))


def test_checkpoint_round_trip_is_exact(tmp_path):
    path = str(tmp_path / "ck.npz")
    out = models.train(small_params(), BIMODAL, VP, TS, rng=5, n_steps=30, batch_size=16, callback=None,
                       online=models.OnlineSchedule(every=10, burn_in=10, n_samples=100))
    models.save_checkpoint(path, out)
    back = models.load_checkpoint(path)
    np.testing.assert_array_equal(back.data_mean, out.data_mean)
    np.testing.assert_array_equal(back.data_var, BIMODAL.variance())
    assert_same_params(out.params, back.params)
    np.testing.assert_array_equal(back.ts, out.ts)
    np.testing.assert_array_equal(back.adam.m, out.adam.m)
    assert back.adam.step == out.adam.step == back.step == 30
    assert back.rng.bit_generator.state == out.rng.bit_generator.state
    for key in out.history:
        np.testing.assert_array_equal(back.history[key], out.history[key])


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    path = str(tmp_path / "run.npz")
    kwargs = dict(n_steps=90, batch_size=32, lr=1e-2, online=models.OnlineSchedule(every=15, burn_in=30, n_samples=100))
    whole = models.train(small_params(), BIMODAL, VP, TS, rng=6, callback=None, **kwargs)

    def interrupt(step, n_steps, info):
        if step == 50:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        models.train(small_params(), BIMODAL, VP, TS, rng=6, callback=models.checkpointer(path, 40, interrupt),
                     **kwargs)
    assert models.load_checkpoint(path).step == 40
    resumed = models.resume(path, small_params(), BIMODAL, VP, TS, rng=6, callback=models.checkpointer(path, 40),
                            **kwargs)
    assert_same_params(whole.params, resumed.params)
    np.testing.assert_array_equal(whole.ts, resumed.ts)
    np.testing.assert_array_equal(whole.history["loss"], resumed.history["loss"])


def test_corrupted_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = str(tmp_path / "ck.npz")
    out = models.train(small_params(), BIMODAL, VP, TS, rng=5, n_steps=5, batch_size=8, callback=None)
    models.save_checkpoint(path, out)
    file = tmp_path / "ck.npz"
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        models.load_checkpoint(path)
    file.write_bytes(raw[:100] + bytes(200) + raw[300:])
    with pytest.raises(ValueError, match="checkpoint"):
        models.load_checkpoint(path)
    with pytest.raises(ValueError, match="no checkpoint"):
        models.load_checkpoint(str(tmp_path / "missing.npz"))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.npz")
    out = models.train(small_params(), BIMODAL, VP, TS, rng=5, n_steps=5, batch_size=8, callback=None)
    models.save_checkpoint(path, out)

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(models.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint(path, out._replace(step=6))
    monkeypatch.undo()
    assert models.load_checkpoint(path).step == 5
    assert os.listdir(tmp_path) == ["ck.npz"]      # no temporary file left behind


def test_divergence_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    path = str(tmp_path / "ck.npz")

    class Poisoned:
        calls = 0

        def sample(self, n, rng):
            Poisoned.calls += 1
            x = BIMODAL.sample(n, rng)
            return x * np.nan if Poisoned.calls == 23 else x

        def mean(self):
            return BIMODAL.mean()

        def variance(self):
            return BIMODAL.variance()
    with pytest.raises(models.TrainingDiverged, match="diverged at step 23: the loss is not finite"):
        models.train(small_params(), Poisoned(), VP, TS, rng=0, n_steps=40, batch_size=8,
                     callback=models.checkpointer(path, every=10))
    assert models.load_checkpoint(path).step == 20


def test_trained_model_plugs_into_costs_and_sampler():
    out = models.train(models.init_mlp(0, width=32, depth=2), BIMODAL, VP, TS, rng=1, n_steps=800,
                       batch_size=128, lr=3e-3, callback=None)
    score = out.score(VP)
    # predictor_cost differentiates the network twice with autograd; check it against a
    # quadrature of the model's own change of variables with finite differences:
    # F(x) = a x + b S(x), grad log q(F(x)) = (S(x) - d/dx log|F'(x)|) / F'(x), x ~ p_t.
    t, t2 = 0.3, 0.25
    a, b = so.ddim_coefficients(VP, t, t2)
    S = lambda y, tt: score(y[:, None], tt)[:, 0]
    F = lambda y: a * y + b * S(y, t)
    x, e = np.linspace(-4, 4, 40_001), 1e-5
    dF = lambda y: (F(y + e) - F(y - e)) / (2 * e)
    grad_q = (S(x, t) - (np.log(np.abs(dF(x + e))) - np.log(np.abs(dF(x - e)))) / (2 * e)) / dF(x)
    p_t = np.exp(BIMODAL.marginal(VP, t).log_prob(x[:, None]))
    quad = VP.sigma(t2) ** 2 * trapezoid(p_t * (S(F(x), t2) - grad_q) ** 2, x)
    L, se = so.predictor_cost(score, VP, t, t2, BIMODAL.sample(20_000, 0), 1)
    assert abs(L - quad) < 4.5 * se
    # Forward-mode autograd through t and central differences see the same x (same seed).
    delta, _ = so.local_cost(score, VP, TS[::6], BIMODAL.sample(2000, 0), 2, derivative="autograd")
    delta_fd, _ = so.local_cost(score, VP, TS[::6], BIMODAL.sample(2000, 0), 2, derivative="central")
    np.testing.assert_allclose(delta, delta_fd, rtol=1e-4)
    # Its Heun samples land near the data: compare with the exact score's on the same schedule.
    x_T = sm.prior_sample(VP, 5000, BIMODAL.variance(), 3)
    x, nfe = sm.sample(score, VP, TS, x_T, 4, predictor="heun")
    x_exact, _ = sm.sample(lambda y, t: BIMODAL.score(y, t, VP), VP, TS, x_T, 4, predictor="heun")
    goal = BIMODAL.marginal(VP, VP.t_min).cdf
    assert nfe == 60 and sm.wasserstein1(x, goal) < sm.wasserstein1(x_exact, goal) + 0.05


def test_training_bad_input():
    p = small_params()
    with pytest.raises(ValueError, match="`n_steps` must be >= 1"):
        models.train(p, BIMODAL, VP, TS, rng=0, n_steps=0)
    with pytest.raises(ValueError, match="`lr` must be positive"):
        models.train(p, BIMODAL, VP, TS, rng=0, n_steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="`lr` must be a real number"):
        models.train(p, BIMODAL, VP, TS, rng=0, n_steps=1, lr="step")
    with pytest.raises(TypeError, match="`online`"):
        models.train(p, BIMODAL, VP, TS, rng=0, n_steps=1, online={"every": 3})
    with pytest.raises(ValueError, match=r"`route` must be a function or one of \['grid', 'intervals'\], got 'spline'"):
        models.OnlineSchedule(route="spline")          # at construction, not after the burn-in
    with pytest.raises(ValueError, match="strictly increasing"):
        models.train(p, BIMODAL, VP, TS[::-1], rng=0, n_steps=1)
    with pytest.raises(ValueError, match=r"`data` must have shape \(n, d\)"):
        models.train(p, np.zeros(5), VP, TS, rng=0, n_steps=1)
    with pytest.raises(ValueError, match="`width` must be >= 1"):
        models.init_mlp(0, width=0)


def test_exploding_parameters_are_reported():
    params = small_params()
    W, b = params[0]
    params[0] = (W * 1e300, b)      # the first forward pass overflows to inf
    with np.errstate(all="ignore"), pytest.raises(
            models.TrainingDiverged, match="step 1: the (parameters are not finite|loss is not finite)"):
        models.train(params, BIMODAL, VP, TS, rng=0, n_steps=5, batch_size=8, callback=None)


def test_the_hand_written_gradient_is_autograd_s_and_trains_bit_for_bit_the_same():
    rng = np.random.default_rng(0)
    params = [(W + 0.1 * rng.standard_normal(W.shape), b + 0.1 * rng.standard_normal(b.shape))
              for W, b in models.init_mlp(1, width=16, depth=3)]
    x0, t = BIMODAL.sample(64, rng), rng.uniform(VP.t_min, VP.t_max, 64)
    batch = models.prepare_dsm(params, x0, t, rng.standard_normal(x0.shape), VP, 0.0, 1.0)
    loss, grad = models.dsm_loss_and_grad(params, batch)
    auto_loss, auto_grad = value_and_grad(models.prepared_dsm_loss)(params, batch)
    assert loss == pytest.approx(auto_loss, rel=1e-14)
    for layer, auto_layer in zip(grad, auto_grad):
        for a, b in zip(layer, auto_layer):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
    runs = [models.train(small_params(), BIMODAL, VP, TS, rng=5, n_steps=20, batch_size=16, gradient=g)
            for g in (None, models.dsm_loss_and_grad)]
    assert_same_params(runs[0].params, runs[1].params)
