"""Your model at scale: SciPy's map convention, picklable adapters, batching, progress, export
conventions, error bars that include the grid, the command line."""
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy.integrate import trapezoid

import models
import sampler as sm
import scoreopt as so

VP = so.vp_linear()
CANTOR = models.mollified_cantor()


def cantor_score(x, t):
    """Module level, so that a process pool can pickle it (by reference)."""
    return CANTOR.score(x, t, VP)


def cantor_eps(x, t):
    """The Cantor target as an eps-prediction model, at module level (picklable)."""
    sigma = np.reshape(VP.sigma(t), (-1, 1)) if np.ndim(t) else VP.sigma(t)
    return -sigma * CANTOR.score(x, t, VP)


def small_map(**kwargs):
    return so.estimate_schedule_map(cantor_score, VP, CANTOR.sample(200, 0), 3, n_grid=30, **kwargs)


# --- SciPy's map convention: workers(func, iterable) ---------------------------------

def test_every_map_in_scipys_convention_gives_the_serial_result_bit_for_bit():
    serial = small_map()
    with ThreadPoolExecutor(2) as threads, multiprocessing.get_context("fork").Pool(2) as pool:
        for workers in (threads.map, pool.map, lambda f, xs: list(map(f, xs)), 2):
            result = small_map(workers=workers)
            np.testing.assert_array_equal(result.Lambda, serial.Lambda)
            np.testing.assert_array_equal(result.Lambda_groups, serial.Lambda_groups)
            assert result.n_evaluations == serial.n_evaluations


def test_a_map_that_returns_in_completion_order_is_put_back_in_order():
    serial = small_map()
    shuffled = small_map(workers=lambda f, xs: list(map(f, xs))[::-1])
    np.testing.assert_array_equal(shuffled.Lambda, serial.Lambda)


@pytest.mark.parametrize("broken, message", [
    (lambda f, xs: list(map(f, xs))[:-1], r"returned \d+ results for \d+ tasks"),
    (lambda f, xs: [None for _ in xs], "returned NoneType where a level's result was expected"),
    (lambda f, xs: [(j, v[:-1], c, r, w) for j, v, c, r, w in map(f, xs)], "wrong-shaped result for level 0"),
    (lambda f, xs: [(j, v * np.nan, c, r, w) for j, v, c, r, w in map(f, xs)], "non-finite result for level 0"),
])
def test_what_a_map_returns_is_checked_and_the_task_named(broken, message):
    with pytest.raises(ValueError, match=message):
        small_map(workers=broken)


def test_adapters_pickle_when_the_model_does_and_run_in_processes():
    score = so.score_from_eps(cantor_eps, VP)
    again = pickle.loads(pickle.dumps(score))
    x = CANTOR.marginal(VP, 0.3).sample(5, 0)
    np.testing.assert_allclose(again(x, 0.3), cantor_score(x, 0.3), rtol=1e-10)
    for adapter in (so.score_from_denoiser, so.score_from_v, so.score_from_flow, so.rowwise_score):
        pickle.dumps(adapter(cantor_eps, VP) if adapter is not so.rowwise_score else adapter(cantor_eps))
    x0 = CANTOR.sample(200, 0)
    serial = so.estimate_schedule_map(score, VP, x0, 3, n_grid=24)
    pooled = so.estimate_schedule_map(score, VP, x0, 3, n_grid=24, workers=2)
    np.testing.assert_array_equal(pooled.Lambda, serial.Lambda)


def test_an_unpicklable_score_with_processes_is_a_clear_error():
    local = lambda x, t: cantor_score(x, t)
    with pytest.raises(TypeError, match=r"`workers` = 2 runs the score in other processes, so the score and the "
                                        r"process must pickle"):
        so.estimate_schedule_map(local, VP, CANTOR.sample(200, 0), 3, n_grid=24, workers=2)


# --- Batching and progress -------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")  # few updates on purpose
def test_batching_changes_nothing_but_the_calls():
    calls = []
    counted = lambda x, t: calls.append(len(x)) or cantor_score(x, t)
    whole = so.estimate_schedule_map(counted, VP, CANTOR.sample(300, 0), 3, n_grid=20)
    calls.clear()
    chunked = so.estimate_schedule_map(counted, VP, CANTOR.sample(300, 0), 3, n_grid=20, batch_size=64)
    np.testing.assert_array_equal(chunked.Lambda, whole.Lambda)
    assert max(calls) == 64 and chunked.metadata["n_calls"] == len(calls) and chunked.n_evaluations == sum(calls)
    ts, x_T = so.uniform_schedule(VP, 6), sm.prior_sample(VP, 100, CANTOR.variance(), 1)
    for predictor in ("euler", "heun", "ancestral", "dpmpp_2m"):
        a = sm.sample(cantor_score, VP, ts, x_T, 2, predictor=predictor)
        b = sm.sample(cantor_score, VP, ts, x_T, 2, predictor=predictor, batch_size=7)
        np.testing.assert_array_equal(a.x, b.x)
        assert a.nfe == b.nfe
    g = models.Gaussian(np.zeros(2), [0.3, 1.0])
    score = lambda x, t: g.score(x, t, VP)
    r1 = sm.equal_error_schedule(score, VP, 6, g.sample(500, 0), 1, max_iter=3)
    r2 = sm.equal_error_schedule(score, VP, 6, g.sample(500, 0), 1, max_iter=3, batch_size=50)
    np.testing.assert_array_equal(r1.ts, r2.ts)


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")  # few updates on purpose
def test_long_calls_report_progress():
    seen = []
    small_map(callback=lambda done, total, info: seen.append((done, total, info["evaluations"])))
    assert [s[0] for s in seen] == list(range(1, 31)) and all(s[1] == 30 for s in seen)
    assert np.all(np.diff([s[2] for s in seen]) > 0)
    steps = []
    sm.sample(cantor_score, VP, so.uniform_schedule(VP, 5), sm.prior_sample(VP, 10, CANTOR.variance(), 0), 1,
              callback=lambda i, T, info: steps.append((i, T, info["t"])))
    assert [s[0] for s in steps] == [1, 2, 3, 4, 5] and steps[-1][2] == VP.t_min
    g = models.Gaussian([0.0], [0.3])
    iterations = []
    sm.equal_error_schedule(lambda x, t: g.score(x, t, VP), VP, 5, g.sample(100, 0), 0, max_iter=4,
                            callback=lambda i, n, info: iterations.append((i, n, info["moved"])))
    assert [i[0] for i in iterations] == list(range(1, len(iterations) + 1)) and iterations[0][1] == 4
    printed = []
    so.progress_printer("map", lines=3, file=type("F", (), {"write": lambda self, s: printed.append(s),
                                                             "flush": lambda self: None})())(30, 30, {"elapsed": 1.0})
    assert "map 30/30" in "".join(printed)


# --- Export in the peers' conventions --------------------------------------------------

def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max, rho), transcribed: n levels, then 0."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def test_sigmas_n_follows_k_diffusions_convention():
    # get_sigmas_karras(n) has n levels and a trailing 0: n model calls with Euler. The map's
    # sigmas(n) has the same shape, its ends are nu_max and nu_min, and it is the levels of the
    # (n - 1)-step schedule.
    smap = small_map()
    for n in (2, 5, 20):
        ours, theirs = smap.sigmas(n), karras_sigmas(n, 0.0105, 152.2)
        assert ours.shape == theirs.shape == (n + 1,) and ours[-1] == 0
        np.testing.assert_allclose(ours[[0, n - 1]], so.nsr(VP, [VP.t_max, VP.t_min]), rtol=1e-9)
        np.testing.assert_allclose(ours, so.to_sigmas(VP, smap.schedule(n - 1)), rtol=1e-3)
    assert smap.sigmas(8, dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="`n` must be >= 2"):
        smap.sigmas(1)


def test_exports_refuse_a_map_of_another_process():
    table = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    ddpm = so.process_from_alphas_cumprod(table)
    smap = small_map()
    with pytest.raises(ValueError, match=r"estimated with the process 'vp_linear\(0.1, 20\)', not 'alphas_cumprod"):
        smap.timesteps(ddpm, 10)
    with pytest.raises(ValueError, match="must be a flow_matching process for flow times"):
        smap.flow_times(VP, 10)
    own = so.estimate_schedule_map(lambda x, t: CANTOR.score(x, t, ddpm), ddpm, CANTOR.sample(200, 0), 3, n_grid=30)
    steps = own.timesteps(ddpm, 10)
    assert len(steps) == 10 and steps[0] == 999 and steps[-1] == 0 and np.all(np.diff(steps) < 0)


def test_flow_times_start_at_one_and_are_the_schedules_times():
    fm = so.flow_matching()
    smap = so.estimate_schedule_map(lambda x, t: CANTOR.score(x, t, fm), fm, CANTOR.sample(200, 0), 3, n_grid=30)
    times = smap.flow_times(fm, 10)
    assert times[0] == 1.0 and len(times) == 10 and np.all(np.diff(times) < 0)
    np.testing.assert_allclose(times[1:], smap.schedule(9)[::-1][1:], rtol=1e-12)
    np.testing.assert_allclose(smap.flow_times(fm, 10, from_one=False)[0], fm.t_max)


# --- Error bars that include the grid ---------------------------------------------------

def test_the_grid_error_is_the_richardson_estimate_of_the_quadrature_error():
    # A score that does not depend on x, S = g(t) = u + sin(u)/2 with u = log nu, has no
    # Monte-Carlo noise: delta(t) = sigma^2 g'(t)^2 exactly, so the map's error is all
    # quadrature. Its Richardson estimate (a third of the difference to the half grid) tracks
    # the true error, which falls like h^2 (by about 4 when the levels double).
    from scipy.integrate import quad
    g = lambda t: np.log(VP.nsr(t)) + 0.5 * np.sin(np.log(VP.nsr(t)))
    score = lambda x, t: np.full(x.shape, g(t))
    lo, hi = np.log(so.nsr(VP, [VP.t_min, VP.t_max]))
    # Lambda = int sigma |dg/dt| dt = int sigma |dg/du| du, u = log nu, dg/du = 1 + cos(u)/2 > 0.
    t_of = lambda u: float(so.time_from_nsr(VP, [np.exp(u)])[0])
    exact_length = quad(lambda u: VP.sigma(t_of(u)) * (1 + 0.5 * np.cos(u)), lo, hi, limit=400)[0]
    true, estimated = [], []
    for n in (21, 41, 81):
        smap = so.estimate_schedule_map(score, VP, np.zeros((20, 1)), 3, n_grid=n)
        true.append(abs(smap.length - exact_length))
        estimated.append(smap.grid_error)
    assert true[0] / true[1] > 3.9 and true[1] / true[2] > 3.9
    np.testing.assert_allclose(estimated, true, rtol=0.05)
    smap = small_map()
    assert smap.length_uncertainty == pytest.approx(np.hypot(smap.length_stderr, smap.grid_error))


# --- The command line -------------------------------------------------------------------

def test_the_command_line_prints_a_saved_map_in_every_convention(tmp_path):
    path = tmp_path / "map.json"
    small_map().save(str(path))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(so.__file__))))
    run = lambda *args: subprocess.run([sys.executable, "-m", "scoreopt", str(path), *args], capture_output=True,
                                       text=True, env=env)
    out = run("-n", "5", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    np.testing.assert_allclose(info["values"], so.load_schedule_map(str(path)).sigmas(5))
    assert info["process"] == VP.name and info["n"] == 5
    text = run("-n", "4", "--convention", "times")
    assert text.returncode == 0 and "Lambda =" in text.stdout
    bad = run("-n", "4", "--convention", "diffusers-timesteps")
    assert bad.returncode == 2 and "needs a map of an alphas_cumprod process" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "scoreopt", str(tmp_path / "none.json")], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "is not a readable schedule map" in missing.stderr


def test_the_length_interval_uses_the_batch_means_degrees_of_freedom_and_covers():
    # 10 groups: the 95% interval is +-t_9(0.975) = 2.262 uncertainties wide, not 1.96; over
    # independent seeds it holds the exact length (closed form of N(0, 0.5^2) under VE) about
    # 95% of the time: at least 34 of 40 (a binomial(40, 0.95) falls below that with
    # probability 0.02), where +-1.96 standard errors would be expected to hold 36.7.
    process, target = so.ve(), models.Gaussian([0.0], [0.25])
    grid = so.uniform_schedule(process, 20_000)
    exact_length = trapezoid(np.sqrt(so.gaussian_local_cost(process, grid, [0.25])), grid)
    maps = [so.estimate_schedule_map(lambda x, t: target.score(x, t, process), process, target.sample(200, s), 100 + s,
                                     n_grid=60) for s in range(40)]
    low, high = maps[0].length_interval(0.95)
    assert (high - low) / 2 == pytest.approx(2.2621571627982 * maps[0].length_uncertainty, rel=1e-9)
    assert maps[0].length_interval(0.5)[1] - maps[0].length < high - maps[0].length
    covered = sum(lo < exact_length < hi for lo, hi in (m.length_interval(0.95) for m in maps))
    assert covered >= 34
    with pytest.raises(ValueError, match="`level` must be in"):
        maps[0].length_interval(1.0)
