"""Bad input, by the rule it breaks: every case gets a clear error, none a silent result.

Organised by the classes of the reliability audit: 1 times, 2 shapes, 3 counts and
rates, 4 callables that misbehave, 5 unstable settings, 6 metrics on degenerate input,
7 checkpoints. Each test reads as the rule; hypothesis draws the spaces of inputs.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, strategies as st

import models
import sampler as sm
import scoreopt as so
from oracles import gaussian_corrector_cost

VE, VP = so.ve(), so.vp_linear()
BIMODAL = models.bimodal()
TS = so.uniform_schedule(VP, 10)
exact = lambda target, process: (lambda x, t: target.score(x, t, process))

outside_range = st.one_of(st.floats(-1e6, -1e-9), st.floats(1.0 + 1e-9, 1e6),
                          st.sampled_from([np.nan, np.inf, -np.inf]))


def small_params(dim=1):
    return models.init_mlp(0, dim=dim, width=8, depth=1, n_fourier=1)


# --- 1. Times out of range or non-finite ---------------------------------------------

@given(outside_range)
def test_noise_levels_exist_only_inside_the_process_range(t):
    with pytest.raises(ValueError, match="`ts` must (be finite|lie in)"):
        so.nsr(VE, [0.5, t])


@given(outside_range)
def test_a_target_score_needs_a_time_in_the_range(t):
    with pytest.raises(ValueError, match="`t`"):
        BIMODAL.score(np.zeros((3, 1)), t, VE)


def test_closed_forms_refuse_times_outside_the_range():
    with pytest.raises(ValueError, match="`ts` must be finite"):
        so.gaussian_local_cost(VE, [0.2, np.nan], [0.25])
    with pytest.raises(ValueError, match="`t_next` must lie in"):
        gaussian_corrector_cost(VE, 0.5, 1.5, [0.25])
    with pytest.raises(ValueError, match="`t_cur` must lie in"):
        so.corrector_cost(exact(BIMODAL, VE), VE, 2.0, 0.5, BIMODAL.sample(10, 0), 0)


def test_costs_are_defined_for_either_order_of_their_times_and_steps_are_not():
    # Decided: L(t, t') is a formula in two times (its local expansion is written
    # L(t, t + h)), so both orders are defined; a sampler step must go towards the data.
    forward = gaussian_corrector_cost(VE, 0.4, 0.5, [0.25])
    backward = gaussian_corrector_cost(VE, 0.5, 0.4, [0.25])
    assert forward > 0 and backward > 0 and forward != backward
    with pytest.raises(ValueError, match="`t_next` must be below `t_cur`"):
        sm.flow_error_cost(exact(BIMODAL, VE), VE, 0.4, 0.5, BIMODAL.sample(40, 0), 0, step=sm.euler_step)


def test_a_process_needs_t_min_below_t_max():
    backwards = VE._replace(t_min=1.0, t_max=0.0)
    with pytest.raises(ValueError, match="finite t_min < t_max"):
        so.uniform_schedule(backwards, 5)
    with pytest.raises(ValueError, match="finite t_min < t_max"):
        so.nsr(VE._replace(t_max=np.nan), [0.0, 1.0])


def test_complex_input_is_refused_not_truncated():
    with pytest.raises(TypeError, match="`ts` must be real"):
        so.check_schedule(TS + 0j, VP)
    with pytest.raises(TypeError, match="`x0` must be real"):
        so.check_data(np.zeros((4, 1)) + 1j)
    with pytest.raises(TypeError, match="`gamma` must be a real number"):
        so.blend(TS, TS, 0.5 + 0.1j)


# --- 2. Shapes -------------------------------------------------------------------------

@given(st.integers(1, 4), st.integers(1, 4))
def test_a_target_scores_only_its_own_dimension(dim, columns):
    target = models.Gaussian(np.zeros(dim), np.ones(dim))
    x = np.zeros((5, columns))
    if columns == dim:
        assert target.score(x, 0.5, VP).shape == (5, dim)
    else:
        with pytest.raises(ValueError, match=rf"`x` must have shape \(n, {dim}\)"):
            target.score(x, 0.5, VP)


def test_training_data_must_match_the_model_dimension():
    with pytest.raises(ValueError, match="`data` has 1 columns but `params` model 2"):
        models.train(small_params(dim=2), BIMODAL.sample(100, 0), VP, TS, rng=0, n_steps=1)


# --- 3. Counts and rates ---------------------------------------------------------------

@given(st.sampled_from(["every", "n_samples", "n_grid"]), st.integers(-5, 0))
def test_online_counts_are_checked_at_construction(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be >="):
        models.OnlineSchedule(**{name: value})


@given(st.one_of(st.floats(-10, 0), st.floats(1.0, 10, exclude_min=True), st.just(np.nan)))
def test_online_gamma_is_checked_at_construction(gamma):
    with pytest.raises(ValueError, match="`gamma`"):
        models.OnlineSchedule(gamma=gamma)


def test_online_method_and_kind_are_checked_at_construction():
    with pytest.raises(ValueError, match="`route` must be"):
        models.OnlineSchedule(route="spline")
    with pytest.raises(ValueError, match="`cost` must be"):
        models.OnlineSchedule(cost="both")


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "`lr` must be positive"),
    (dict(levels="spline"), "`levels` must be a function or one of"),
    (dict(batch_size=0), "`batch_size` must be >= 1"),
    (dict(n_steps=0), "`n_steps` must be >= 1"),
])
def test_training_settings_are_checked_before_any_step(kwargs, message):
    calls = []
    settings = dict(n_steps=5, callback=lambda *a: calls.append(a))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        models.train(small_params(), BIMODAL, VP, TS, rng=0, **settings)
    assert calls == []


def test_training_without_a_schedule_needs_uniform_levels():
    with pytest.raises(ValueError, match="`ts` is needed"):
        models.train(small_params(), BIMODAL, VP, rng=0, n_steps=1)
    out = models.train(small_params(), BIMODAL, VP, rng=0, n_steps=3, levels="uniform", callback=None)
    assert out.step == 3


def test_a_cantor_level_that_would_not_fit_says_its_size():
    with pytest.raises(ValueError, match=r"2\^40 = 1,099,511,627,776 mixture components"):
        models.mollified_cantor(level=40)


@given(st.integers(-2 ** 40, -1))
def test_a_seed_is_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="`rng` must be >= 0"):
        so.as_rng(seed)


def test_a_predictor_is_a_name_or_a_function():
    for bad in (["euler"], 3, None):
        with pytest.raises(ValueError, match="`predictor` must be one of"):
            sm.sample(exact(BIMODAL, VP), VP, TS, np.zeros((3, 1)), 0, predictor=bad)


# --- 4. Callables that misbehave -----------------------------------------------------

def test_a_score_that_raises_is_chained_with_the_time_and_the_step():
    def broken(x, t):
        if t < 0.5:
            raise KeyError("model weights missing")
        return BIMODAL.score(x, t, VP)
    with pytest.raises(so.ScoreEvaluationError, match=r"`score` raised KeyError at t = 0\.4.* \(step 7 of 10") as err:
        sm.sample(broken, VP, TS, np.zeros((3, 1)), 0, predictor="euler")
    assert isinstance(err.value.__cause__, KeyError)
    with pytest.raises(so.ScoreEvaluationError, match="`score` raised KeyError"):
        so.corrector_cost(broken, VP, 0.4, 0.3, BIMODAL.sample(10, 0), 0)


def test_a_velocity_returning_nan_is_named_not_blamed_on_delta():
    with pytest.raises(ValueError, match="`velocity` returned nan at t = "):
        so.local_cost(exact(BIMODAL, VP), VP, TS, BIMODAL.sample(10, 0), 0, velocity=lambda t: np.nan * t)
    with pytest.raises(ValueError, match="`velocity` returned"):
        so.corrector_cost(exact(BIMODAL, VP), VP, 0.5, 0.4, BIMODAL.sample(10, 0), 0, velocity=lambda t: -1.0)


def test_an_exact_score_returning_nan_is_named_in_score_error():
    with pytest.raises(ValueError, match="`exact_score` returned non-finite values"):
        sm.score_error(exact(BIMODAL, VP), lambda x, t: x * np.nan, VP, TS, BIMODAL.sample(10, 0), 0)


# --- 5. Numerically unstable settings --------------------------------------------------

def test_exploding_samples_stop_the_sampler_naming_the_step():
    x_T = sm.prior_sample(VP, 100, BIMODAL.variance(), 0)
    with pytest.raises(FloatingPointError, match=r"(exploded|non-finite) .*\(step 1 of 10"):
        sm.sample(exact(BIMODAL, VP), VP, TS, x_T, 1, predictor="euler", corrector_steps=2, corrector_ratio=1e6)


def test_growth_can_be_counted_instead_of_refused_but_never_non_finite():
    grow = lambda score, process, x, t_cur, t_next, rng: (x * 1e4, 0)       # a step that throws samples away
    x_T = np.ones((3, 1))
    with pytest.raises(FloatingPointError, match=r"exploded to \|x\| = 1e\+08 \(step 2 of 10"):
        sm.sample(exact(BIMODAL, VP), VP, TS, x_T, 0, predictor=grow)
    x, _ = sm.sample(exact(BIMODAL, VP), VP, TS, x_T, 0, predictor=grow, max_growth=None)
    np.testing.assert_allclose(x, 1e40, rtol=1e-12)
    with np.errstate(over="ignore"), pytest.raises(FloatingPointError, match="non-finite"):
        sm.sample(exact(BIMODAL, VP), VP, TS, x_T, 0, predictor=lambda *a: (a[2] * 1e40, 0), max_growth=None)


# --- 6. Metrics on degenerate input ----------------------------------------------------

@pytest.mark.parametrize("samples, message", [([0.1, np.nan], "`samples` must be finite"),
                                              ([], "at least 1 sample")])
def test_wasserstein_needs_finite_samples(samples, message):
    with pytest.raises(ValueError, match=message):
        sm.wasserstein1(np.array(samples), BIMODAL.cdf)


@pytest.mark.parametrize("cdf", [scipy.stats.cauchy.cdf, lambda x: 0.5 + 0.0 * np.asarray(x)],
                         ids=["cauchy", "constant"])
def test_wasserstein_does_not_hang_on_a_cdf_that_never_reaches_its_tails(cdf):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="does not reach"):
        sm.wasserstein1(np.linspace(-1, 1, 100), cdf)
    assert time.perf_counter() - start < 5


def test_metrics_refuse_degenerate_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        sm.density_estimate([0.3], np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="must not all be equal"):
        sm.density_estimate([0.3, 0.3, 0.3], np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="`modes` must be a non-empty"):
        sm.mode_coverage(np.zeros(5), [])
    with pytest.raises(ValueError, match="`x0` needs at least 2 rows"):
        sm.score_error(exact(BIMODAL, VP), exact(BIMODAL, VP), VP, TS, BIMODAL.sample(1, 0), 0)
    with pytest.raises(ValueError, match="variances `var`, `target_var` finite and positive"):
        sm.gaussian_kl([0.0], [-1.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="`costs` must not be empty"):
        so.path_energy([])
    with pytest.raises(ValueError, match="`costs` must not be empty"):
        so.path_length([])


# --- 7. Checkpoints ----------------------------------------------------------------------

def run(tmp_path, n_steps=20, **kwargs):
    path = str(tmp_path / "ck.npz")
    settings = dict(rng=0, n_steps=n_steps, batch_size=8, callback=models.checkpointer(path, every=10))
    settings.update(kwargs)
    params = settings.pop("params", small_params())
    return models.resume(path, params, BIMODAL, settings.pop("process", VP), settings.pop("ts", TS), **settings)


def test_a_checkpoint_folder_that_cannot_take_a_file_fails_before_step_one(tmp_path):
    calls = []
    for path in (tmp_path / "missing" / "ck.npz", tmp_path / "file" / "ck.npz"):
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(ValueError, match="`path`: the folder .* does not exist"):
            models.train(small_params(), BIMODAL, VP, TS, rng=0, n_steps=5,
                         callback=models.checkpointer(str(path), callback=lambda *a: calls.append(a)))
    with pytest.raises(ValueError, match="`every` must be >= 1"):
        models.checkpointer(str(tmp_path / "ck.npz"), every=0)
    assert calls == []


@pytest.mark.parametrize("change, differs", [
    (dict(params=models.init_mlp(1, width=4, depth=2, n_fourier=1)), "layer_shapes"),
    (dict(process=so.vp_linear(beta_max=10.0)), "process"),
    (dict(ts=so.uniform_schedule(VP, 12)), "initial_ts"),
    (dict(lr=3e-3), "lr"),
    (dict(batch_size=16), "batch_size"),
    (dict(n_steps=30), "n_steps"),
    (dict(online=models.OnlineSchedule(every=5, burn_in=0, n_samples=50)), "online"),
    (dict(levels="between"), "levels"),
    (dict(preconditioning="eps"), "preconditioning"),
])
def test_resume_refuses_a_checkpoint_of_another_run_saying_what_differs(tmp_path, change, differs):
    run(tmp_path)
    with pytest.raises(ValueError, match=f"belongs to another run; it differs in .*{differs}: saved"):
        run(tmp_path, **change)


def test_resume_can_extend_a_run_on_purpose(tmp_path):
    run(tmp_path)
    out = run(tmp_path, n_steps=30, allow_changes=("n_steps",))
    assert out.step == 30 and len(out.history["loss"]) == 30
    with pytest.raises(ValueError, match="`allow_changes` names unknown settings"):
        run(tmp_path, n_steps=40, allow_changes=("steps",))


def test_resume_refuses_a_checkpoint_beyond_n_steps(tmp_path):
    run(tmp_path, n_steps=20)
    with pytest.raises(ValueError, match="is a training state at step 20, beyond `n_steps` = 10"):
        run(tmp_path, n_steps=10, allow_changes=("n_steps",))


def test_a_checkpoint_with_a_reversed_schedule_does_not_load(tmp_path):
    out = run(tmp_path)
    path = str(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="its loader would refuse it: field `ts` must be strictly increasing"):
        models.save_checkpoint(path, out._replace(ts=out.ts[::-1]))
    assert not os.path.exists(path)
    models.save_checkpoint(path, out)                 # the same file reversed by hand: the loader refuses it too
    with np.load(path) as f:
        arrays = dict(f)
    arrays["ts"] = arrays["ts"][::-1]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="is not a valid checkpoint: field `ts` must be strictly increasing"):
        models.load_checkpoint(path)


def test_leftover_temporary_files_are_removed_and_the_umask_is_respected(tmp_path):
    # A temporary file of a killed writer (its process is gone) is removed by the next save;
    # one of a writer still running (here: this process) is left alone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f".ck.npz.{gone.pid}.abc12345.tmp").write_bytes(b"half a save")
    running = tmp_path / f".ck.npz.{os.getpid()}.def45678.tmp"
    running.write_bytes(b"a save in progress")
    old = os.umask(0o027)
    try:
        run(tmp_path)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == [running.name, "ck.npz"]
    assert os.stat(tmp_path / "ck.npz").st_mode & 0o777 == 0o640
