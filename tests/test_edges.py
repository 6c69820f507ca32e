"""Behaviours that no test reached until mutation testing found them (docs/mutation.md):
the flow rule's weight in a rotated basis and with a data end below s = 1, the Gaussian
control variate in several dimensions, maps of a process that ends below t = 1, and small
contracts of the metrics, the progress printer and the checkpoint folder."""
import os

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VP = so.vp_linear()


def exact(target, process):
    return lambda x, t: target.score(x, t, process)


# --- The flow rule's weight --------------------------------------------------------------

def test_the_flow_weight_is_the_same_whatever_the_order_of_its_eigenvectors():
    # The weight is sum_k w(lam_k) (U^T delta)_k^2: permuting U's columns together with the
    # eigenvalues changes nothing, exactly; using delta's own coordinates would.
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((500, 3)) @ np.array([[1.0, 0.6, 0.0], [0.0, 0.4, 0.3], [0.0, 0.0, 2.0]])
    weight = sm.flow_weight(x0, "data")
    permuted = sm.FlowWeight("data", weight.basis[:, [2, 0, 1]], weight.variances[[2, 0, 1]], 0.0)
    mean, cov = x0.mean(axis=0), np.cov(x0.T)

    def score(x, t):                          # the exact score of N(mean, cov) under VP, one time per row
        s, sigma = VP.s(t)[:, None], VP.sigma(t)[:, None]
        return np.stack([-np.linalg.solve(si ** 2 * cov + sg ** 2 * np.eye(3), xi - si * mean)
                         for xi, si, sg in zip(x, s[:, 0], sigma[:, 0])])

    costs = [sm.flow_error_cost(score, VP, 0.6, 0.3, x0[:64], 1, step="euler", weight=w).value
             for w in (weight, permuted)]
    assert costs[0] == pytest.approx(costs[1], rel=1e-10)
    plain = sm.flow_error_cost(score, VP, 0.6, 0.3, x0[:64], 1, step="euler",
                               weight=sm.FlowWeight("data", np.eye(3), weight.variances, 0.0)).value
    assert plain != pytest.approx(costs[0], rel=1e-3)          # the basis matters for correlated data


def test_the_scalar_flow_weight_is_isotropic_with_the_mean_variance():
    # "scalar" is the data weight with no eigenpair kept (k = 0): every direction gets the mean
    # variance, the mean eigenvalue of the covariance the full weight (k = d) decomposes.
    x0 = np.random.default_rng(1).standard_normal((400, 4)) * np.array([0.1, 1.0, 2.0, 3.0])
    weight, full = sm.flow_weight(x0, "scalar"), sm.flow_weight(x0, "data")
    assert weight.kind == "data" and weight.basis.shape == (4, 0) and weight.variances.shape == (0,)
    assert weight.rest == pytest.approx(np.mean(x0.var(axis=0, ddof=1)), rel=1e-12)
    assert weight.rest == pytest.approx(np.mean(full.variances), rel=1e-12)
    assert weight.scale == pytest.approx(full.scale, rel=1e-12)
    assert full.basis.shape == (4, 4) and full.rest == 0.0


def test_the_flow_weight_carries_errors_to_a_data_end_where_s_is_below_one():
    # vp_linear with t_min = 0.2 ends at s(t_min) = 0.81: the gain (s0^2 lam + sigma0^2)/A' is
    # not the one of s0 = 1, and the closed form (tests/test_flow_rule.py) must see it.
    process = so.vp_linear(t_min=0.2)
    lam = np.array([0.05, 2.0])
    target = models.Gaussian(np.zeros(2), lam)
    t, t2 = 0.7, 0.35
    weight = sm.FlowWeight("data", np.eye(2), lam, 0.0)
    value, se = sm.flow_error_cost(exact(target, process), process, t, t2, target.sample(20_000, 0), 1,
                                   step="euler", weight=weight)
    nu, nu2 = float(process.nsr(t)), float(process.nsr(t2))
    a = 1 - nu * (nu - nu2) / (lam + nu ** 2)
    heun = lambda lam, n1, n2: 1 - (n1 - n2) / 2 * (n1 / (lam + n1 ** 2) + n2 / (lam + n2 ** 2)
                                                      * (1 - n1 * (n1 - n2) / (lam + n1 ** 2)))
    c = np.sqrt(np.mean(lam))
    grid = c * np.sinh(np.arcsinh(nu / c) + np.array([0, 0.5, 1]) * (np.arcsinh(nu2 / c) - np.arcsinh(nu / c)))
    a_K = heun(lam, grid[0], grid[1]) * heun(lam, grid[1], grid[2])
    s0, sigma0 = float(process.s(process.t_min)), float(process.sigma(process.t_min))
    s2, sigma2 = float(process.s(t2)), float(process.sigma(t2))
    assert s0 < 0.85
    w = (s0 ** 2 * lam + sigma0 ** 2) / (s2 ** 2 * lam + sigma2 ** 2)
    closed = np.mean(w * s2 ** 2 * (a - a_K) ** 2 * (lam + nu ** 2))
    assert abs(value - closed) < 4.5 * se and se < 0.05 * closed


# --- The control variate in several dimensions ---------------------------------------------

def test_the_control_variate_fits_each_coordinate_its_own_variance():
    # Anisotropic Gaussian data (variances 0.01 and 4): the Gaussian fit is the exact law, and
    # the control removes most of the spread only if each coordinate gets its own variance
    # (a pooled variance leaves the spread at the plain estimate's).
    target = models.Gaussian(np.zeros(2), [0.01, 4.0])
    spread = {cv: np.mean([np.mean((m.delta_stderr / m.delta))
                           for m in (so.estimate_schedule_map(exact(target, VP), VP, target.sample(400, s), 1 + s,
                                                              n_grid=20, control_variate=cv) for s in range(4))])
              for cv in (False, True)}
    assert spread[True] < 0.7 * spread[False]


# --- Maps of a process that ends below t = 1, and exact ones --------------------------------

def test_a_flow_matching_map_round_trips_through_json(tmp_path):
    fm = so.flow_matching()
    assert fm.t_max < 1.0
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, fm), fm, target.sample(200, 0), 1, n_grid=20)
    path = str(tmp_path / "flow.json")
    smap.save(path)
    back = so.load_schedule_map(path)
    np.testing.assert_array_equal(back.schedule(8), smap.schedule(8))
    np.testing.assert_array_equal(back.flow_times(fm, 9), smap.flow_times(fm, 9))


def test_a_map_with_zero_error_bars_loads(tmp_path):
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, VP), VP, target.sample(200, 0), 1, n_grid=20)
    exact_map = smap._replace(length_stderr=0.0, grid_error=0.0)
    path = str(tmp_path / "exact.json")
    exact_map.save(path)
    back = so.load_schedule_map(path)
    assert back.length_stderr == 0.0 and back.grid_error == 0.0


# --- Small contracts ---------------------------------------------------------------------

def test_a_density_estimate_takes_samples_with_ties():
    density = sm.density_estimate([0.0, 0.0, 1.0, 2.0], np.linspace(-1, 3, 5))
    assert np.all(np.isfinite(density)) and np.all(density > 0)
    with pytest.raises(ValueError, match="must not all be equal"):
        sm.density_estimate([1.0, 1.0, 1.0], [0.0])


def test_the_change_of_variables_refuses_a_multistep_step():
    target = models.Gaussian([0.0], [0.3])
    prior = models.Gaussian([0.0], [float(VP.s(VP.t_max)) ** 2 * 0.3 + float(VP.sigma(VP.t_max)) ** 2])
    with pytest.raises(ValueError, match="carries a state"):
        sm.flow_log_density(exact(target, VP), VP, so.loglinear_schedule(VP, 4), np.zeros((3, 1)),
                            lambda x: prior.log_prob(x), predictor="dpmpp_2m")


def test_the_progress_printer_shows_the_elapsed_time():
    printed = []
    out = type("F", (), {"write": lambda self, s: printed.append(s), "flush": lambda self: None})()
    so.progress_printer("map", lines=1, file=out)(4, 4, {"elapsed": 12.5, "evaluations": 1000})
    assert "map 4/4" in "".join(printed) and "12.5 s" in "".join(printed)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no one can create a file")
def test_a_checkpoint_folder_that_takes_no_file_is_refused_before_step_one():
    steps = []
    with pytest.raises(ValueError, match="cannot write in `/proc`"):
        models.train(models.init_mlp(0, width=8, depth=1), models.bimodal(), VP, so.uniform_schedule(VP, 4),
                     rng=0, n_steps=5, callback=models.checkpointer("/proc/scoreopt-test.npz",
                                                                    callback=lambda step, n, info: steps.append(step)))
    assert steps == []


# --- Defaults that results depend on --------------------------------------------------

def test_the_edm_schedule_defaults_to_rho_seven_and_the_baselines_to_c_one_half():
    # Karras et al.'s formula written out: nu_i = (nu_max^(1/7) + i/T (nu_min^(1/7) - nu_max^(1/7)))^7.
    process = so.ve()
    nu = (80.0 ** (1 / 7) + np.arange(9) / 8 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(so.nsr(process, so.edm_schedule(process, 8))[::-1], nu, rtol=1e-9)
    np.testing.assert_array_equal(so.baseline_schedules(process, 8)["arctan"], so.arctan_schedule(process, 8, 0.5))


def test_adams_first_step_moves_every_parameter_by_the_learning_rate():
    # With bias correction, m_hat = g and v_hat = g^2 at step 1: each parameter moves by
    # lr * g / (|g| + eps), i.e. by lr against the sign of its gradient.
    theta, grad = np.zeros(4), np.array([3.0, -0.5, 1e-3, -20.0])
    new, state = models.adam_step(theta, grad, models.adam_init(theta), 0.01)
    np.testing.assert_allclose(new, -0.01 * np.sign(grad), rtol=1e-4)
    assert state.step == 1


def test_a_float_learning_rate_is_its_cosine_decay_function():
    # lr = 1e-3 decays as 1e-3 (1 + cos(pi step / n_steps)) / 2; a function lr(step, n_steps) is used as it is.
    run = lambda lr: models.train(models.init_mlp(0, width=8, depth=1), models.bimodal(), VP,
                                  so.uniform_schedule(VP, 4), rng=0, n_steps=6, lr=lr).params
    cosine = lambda step, n_steps: 1e-3 * 0.5 * (1 + np.cos(np.pi * step / n_steps))
    constant = run(lambda step, n_steps: 1e-3)
    assert np.max(np.abs(run(1e-3)[0][0] - constant[0][0])) > 1e-4          # the rate does decay
    for (W, b), (W2, b2) in zip(run(1e-3), run(cosine)):                      # to rounding: the same rate
        np.testing.assert_allclose(W, W2, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(b, b2, rtol=1e-12, atol=1e-15)


def test_the_maps_metadata_names_the_velocity_and_the_groups():
    target = models.Gaussian([0.0], [0.3])

    def half_sigma(t):
        return 0.5 * VP.sigma(t)
    smap = so.estimate_schedule_map(exact(target, VP), VP, target.sample(100, 0), 1, n_grid=10, velocity=half_sigma)
    assert smap.metadata["velocity"] == "half_sigma" and smap.metadata["n_groups"] == 10


def test_a_rowwise_score_calls_the_score_once_per_distinct_time():
    calls, target = [], models.Gaussian([0.0], [0.3])

    def score(x, t):
        assert np.ndim(t) == 0
        calls.append(t)
        return target.score(x, t, VP)
    x, t = target.sample(6, 0), np.array([0.2, 0.5, 0.2, 0.9, 0.5, 0.2])
    out = so.rowwise_score(score)(x, t)
    np.testing.assert_array_equal(out, np.vstack([target.score(x[i:i + 1], t[i], VP) for i in range(6)]))
    assert sorted(calls) == [0.2, 0.5, 0.9]


@pytest.mark.parametrize("where", ["creating the temporary file", "flushing it"])
def test_a_full_disk_keeps_the_errno(tmp_path, monkeypatch, where):
    import errno
    real_open = os.open

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_on_create(path, flags, *args, **kwargs):      # the temporary file is created with O_CREAT
        return full() if flags & os.O_CREAT else real_open(path, flags, *args, **kwargs)
    if where == "flushing it":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(os, "open", full_on_create)
    with pytest.raises(OSError) as info:
        so.write_atomically(str(tmp_path / "out.txt"), "text")
    assert info.value.errno == errno.ENOSPC and "out.txt" in str(info.value)


def test_the_command_line_in_process_prints_every_convention(tmp_path, capsys):
    # The same as `python -m scoreopt` (tests/test_scaling.py runs it as a subprocess).
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, VP), VP, target.sample(200, 0), 1, n_grid=20)
    path = str(tmp_path / "map.json")
    smap.save(path)
    assert so.main([path, "-n", "6", "--convention", "k-diffusion", "--json"]) == 0
    import json
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(printed["values"], smap.sigmas(6), rtol=1e-12)
    assert printed["n"] == 6 and printed["process"] == VP.name and len(printed["values"]) == 7
    for convention, expected in (("diffusers-sigmas", smap.sigmas(6)), ("times", smap.schedule(5))):
        assert so.main([path, "-n", "6", "--convention", convention, "--json"]) == 0
        np.testing.assert_allclose(json.loads(capsys.readouterr().out)["values"], expected, rtol=1e-12)


def test_the_command_line_in_process_exports_a_tables_timesteps_and_the_fewest_levels(tmp_path, capsys):
    import json
    table = so.process_from_alphas_cumprod(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, table), table, target.sample(200, 0), 1, n_grid=20)
    path = str(tmp_path / "table.json")
    smap.save(path)
    assert so.main([path, "-n", "6", "--convention", "diffusers-timesteps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["values"] == smap.timesteps(table, 6).tolist()
    assert so.main([path, "-n", "2", "--convention", "times", "--json"]) == 0      # n = 2: one step
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["values"], smap.schedule(1), rtol=1e-12)
