"""Reliability, second round: each class of the audit of the newer surface, as a rule.

1 valid real data accepted, 2 model outputs checked where they come back, 3 low
precision, 4 noise tables, 5 schedule-map files, 6 custom sampler steps, 7 flags that
must be booleans, 8 faults (kills, full disks, misbehaving velocities).
"""
import errno
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
BIMODAL = models.bimodal()
exact = lambda target, process: (lambda x, t: target.score(x, t, process))


def small_params(dim=1):
    return models.init_mlp(0, dim=dim, width=8, depth=1, n_fourier=1)


# --- 1. Valid real data is accepted ---------------------------------------------------

def test_a_constant_coordinate_and_a_single_row_train():
    rng = np.random.default_rng(0)
    images = np.column_stack([rng.uniform(-1, 1, 500), np.full(500, -1.0)])     # a border pixel, always -1
    out = models.train(small_params(dim=2), images, VP, so.uniform_schedule(VP, 5), rng=0, n_steps=20, batch_size=32)
    assert out.data_var[1] == 0 and np.all(np.isfinite(out.params[-1][0]))
    x = np.array([[0.3, -1.0]])
    np.testing.assert_allclose(out.score(VP)(x * VP.s(0.3), 0.3)[:, 1], 0.0, atol=1e-9)   # the mean, exactly
    one = models.train(small_params(), np.array([[0.5]]), VP, so.uniform_schedule(VP, 5), rng=0, n_steps=5)
    assert one.data_mean[0] == 0.5 and one.data_var[0] == 0.0


class Moments:
    """A target that reports its moments (the preconditioning uses them as they are)."""

    def __init__(self, mean, var):
        self.mean, self.variance = (lambda: np.array(mean, dtype=float)), (lambda: np.array(var, dtype=float))

    def sample(self, n, rng):
        return np.zeros((n, len(self.mean())))


def test_invalid_moments_name_what_the_user_passed():
    # The moments come from `data`: a target's own, or the samples'.
    calls = []
    train = lambda params, data: models.train(params, data, VP, so.uniform_schedule(VP, 5), rng=0, n_steps=1,
                                              callback=lambda *a: calls.append(a))
    with pytest.raises(ValueError, match=r"the mean and variance of `data` must be finite \(variance >= 0\); "
                                         "coordinate 1 has mean 0.0 and variance -0.5"):
        train(small_params(dim=2), Moments([0.0, 0.0], [1.0, -0.5]))
    with pytest.raises(ValueError, match="coordinate 0 has mean nan and variance 1.0"):
        train(small_params(), Moments([np.nan], [1.0]))
    with pytest.raises(ValueError, match="`data` has 3 columns but `params` model 2"):
        train(small_params(dim=2), Moments([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="`data` must be finite"):
        train(small_params(dim=2), np.array([[0.0, np.nan], [1.0, 2.0]]))
    assert calls == []


def test_data_at_a_scale_the_process_never_reaches_is_warned_of(monkeypatch):
    monkeypatch.setattr(models, "MAX_LOSS_RATIO", 1e12)
    with pytest.warns(RuntimeWarning, match=r"scale \(1e\+06.*above the largest noise-to-signal ratio of the process "
                                            r"vp_linear\(0.1, 20\) \(152"):
        models.train(small_params(), np.full((50, 1), 1e6) + np.arange(50)[:, None], VP,
                     so.uniform_schedule(VP, 5), rng=0, n_steps=2)
    with pytest.warns(RuntimeWarning, match="below the smallest noise-to-signal ratio"):
        models.train(small_params(), np.linspace(0, 1e-4, 50)[:, None], VP, so.uniform_schedule(VP, 5), rng=0,
                     n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.train(small_params(), BIMODAL.sample(50, 0), VP, so.uniform_schedule(VP, 5), rng=0, n_steps=2)


# --- 2. Model outputs are checked where they come back --------------------------------

@pytest.mark.parametrize("adapter, name", [(so.score_from_eps, "eps_model"), (so.score_from_v, "v_model"),
                                           (so.score_from_flow, "flow_model"), (so.score_from_denoiser, "denoiser")])
@pytest.mark.parametrize("output, error, message", [
    (lambda x: x[:, 0], ValueError, r"returned shape \(6,\) at t = 0.3; expected \(6, 1\)"),
    (lambda x: None, TypeError, r"returned NoneType at t = 0.3; expected an array of shape \(6, 1\)"),
    (lambda x: x.tolist(), TypeError, "returned list at t = 0.3"),
    (lambda x: 0.5, TypeError, "returned float at t = 0.3"),
    (lambda x: np.full(x.shape, np.inf), ValueError, "returned non-finite values at t = 0.3"),
])
def test_every_adapter_checks_its_models_output_and_names_the_model(adapter, name, output, error, message):
    score = adapter(lambda x, t: output(x), VP)
    with pytest.raises(error, match=f"`{name}` {message}"):
        score(np.zeros((6, 1)), 0.3)


def test_a_wrong_shape_is_caught_before_any_broadcast_so_large_batches_cost_nothing():
    calls = []
    score = so.score_from_eps(lambda x, t: calls.append(1) or np.zeros(len(x)), VP)
    with pytest.raises(ValueError, match=r"returned shape \(1000000,\)"):
        so.estimate_schedule_map(score, VP, np.zeros((1_000_000, 1)), 0, n_grid=20)
    assert calls == [1]


# --- 3. Low precision ----------------------------------------------------------------

def test_a_score_below_float32_precision_is_warned_of_once_naming_the_dtype():
    half = lambda x, t: BIMODAL.score(x, t, VP).astype(np.float16)
    with pytest.warns(RuntimeWarning, match="`score` returns float16, below float32 precision") as record:
        so.estimate_schedule_map(half, VP, BIMODAL.sample(200, 0), 1, n_grid=20)
    assert sum("float16" in str(w.message) for w in record) == 1
    with pytest.warns(RuntimeWarning, match="`eps_model` returns float16"):
        so.score_from_eps(lambda x, t: np.zeros(x.shape, np.float16), VP)(np.zeros((2, 1)), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        so.estimate_schedule_map(lambda x, t: half(x, t).astype(np.float32), VP, BIMODAL.sample(200, 0), 1, n_grid=20)


# --- 4. Noise tables -------------------------------------------------------------------

def test_a_table_whose_log_snr_barely_moves_is_refused():
    table = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 100))
    flat = table.copy()
    flat[40] = flat[39] * (1 - 1e-13)
    with pytest.raises(ValueError, match=r"`alphas_cumprod` is too flat: its log-SNR falls by .* from entry 39 to 40"):
        so.process_from_alphas_cumprod(flat)


def test_the_score_is_never_evaluated_outside_the_process_range():
    # A table with a nearly constant stretch: there the finite-difference step in t, which is
    # relative in log nu, would be huge; it is capped at a quarter of the range.
    table = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 20))
    table[5:15] = table[5] * np.exp(-1e-6 * np.arange(1, 11))
    p = so.process_from_alphas_cumprod(table)
    seen = []
    score = lambda x, t: seen.append(t) or -x / (p.s(t) ** 2 * 0.25 + p.sigma(t) ** 2)
    so.estimate_schedule_map(score, p, np.random.default_rng(0).standard_normal((40, 1)) * 0.5, 0, n_grid=50)
    assert p.t_min <= min(seen) and max(seen) <= p.t_max


# --- 5. Schedule-map files ------------------------------------------------------------

def saved_map(tmp_path):
    smap = so.estimate_schedule_map(exact(BIMODAL, VP), VP, BIMODAL.sample(100, 0), 7, n_grid=20)
    path = tmp_path / "map.json"
    smap.save(str(path))
    return smap, path


FIELD_DAMAGE = [
    ("ts", lambda v: v[:3] + [v[1]] + v[4:], "`ts` must be strictly increasing"),
    ("ts", lambda v: ["0.001"] + v[1:], "`ts` must hold numbers, found str"),
    ("delta", lambda v: [-1.0] + v[1:], "`delta` must be finite and non-negative"),
    ("delta_stderr", lambda v: v[:-1], "`delta_stderr` must be a 1-D array of length 20"),
    ("Lambda", lambda v: [0.0] + [v[2]] + [v[1]] + v[3:], "`Lambda` must start at 0, not decrease"),
    ("Lambda", lambda v: [0.0] * len(v), "`Lambda` must start at 0, not decrease, and not be all zero"),
    ("Lambda_groups", lambda v: v[:1], r"`Lambda_groups` must be non-negative and non-decreasing with shape"),
    ("Lambda_groups", lambda v: [r[::-1] for r in v], "`Lambda_groups` must be non-negative and non-decreasing"),
    ("length_stderr", lambda v: -1.0, r"`length_stderr` must be >= 0"),
    ("grid_error", lambda v: "small", r"`grid_error` must be a finite number"),
    ("order", lambda v: 5, r"`order` must be one of \(1, 2, 3, 4, 6, 8\), got 5"),
    ("order", lambda v: True, r"`order` must be one of"),
    ("n_evaluations", lambda v: 1.5, "`n_evaluations` must be a non-negative integer"),
    ("metadata", lambda v: dict(v, nu=v["nu"][::-1]), "`metadata.nu` must be 20 finite, positive, increasing"),
    ("metadata", lambda v: dict(v, t_min=0.5), r"`ts` must lie inside the recorded range"),
    ("metadata", lambda v: dict(v, process=3), "`metadata.process` must be a string"),
    ("metadata", lambda v: [v], "`metadata` must be an object"),
]


@pytest.mark.parametrize("field, damage, message", FIELD_DAMAGE, ids=[f"{f}-{m[:20]}" for f, _, m in FIELD_DAMAGE])
def test_every_field_of_a_map_file_is_checked_and_named(tmp_path, field, damage, message):
    _, path = saved_map(tmp_path)
    data = json.loads(path.read_text())
    data[field] = damage(data[field])
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"`{path}` is not a valid schedule map: .*{message}"):
        so.load_schedule_map(str(path))


@given(st.integers(1, 400))
def test_a_file_cut_anywhere_is_a_clear_error(cut):
    path = os.path.join(TMP, "cut.json")
    text = open(os.path.join(TMP, "whole.json")).read()
    with open(path, "w") as f:
        f.write(text[:-cut])
    with pytest.raises(ValueError, match="is not a (readable|valid) schedule map"):
        so.load_schedule_map(path)


@pytest.fixture(scope="module", autouse=True)
def _whole_map(tmp_path_factory):
    global TMP
    TMP = str(tmp_path_factory.mktemp("maps"))
    so.estimate_schedule_map(exact(BIMODAL, VP), VP, BIMODAL.sample(100, 0), 7, n_grid=20).save(
        os.path.join(TMP, "whole.json"))


def test_deeply_nested_or_foreign_json_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is not a readable schedule map: RecursionError"):
        so.load_schedule_map(str(path))
    path.write_text('{"format": "scoreopt.ScheduleMap/1"}')
    with pytest.raises(ValueError, match="missing field 'ts'"):
        so.load_schedule_map(str(path))


def test_saving_converts_numpy_values_and_refuses_non_finite_ones_by_field(tmp_path):
    smap, _ = saved_map(tmp_path)
    numpy_scalars = smap._replace(length_stderr=np.float32(smap.length_stderr),
                                  metadata=dict(smap.metadata, t_min=np.float32(1e-3), n_grid=np.int64(20)))
    numpy_scalars.save(str(tmp_path / "ok.json"))
    back = so.load_schedule_map(str(tmp_path / "ok.json"))
    assert back.metadata["n_grid"] == 20 and back.length_stderr == pytest.approx(smap.length_stderr, rel=1e-6)
    with pytest.raises(ValueError, match="cannot save field `length_stderr`: it holds nan"):
        smap._replace(length_stderr=np.nan).save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="cannot save field `metadata.note`: it holds inf"):
        smap._replace(metadata=dict(smap.metadata, note=[1.0, np.inf])).save(str(tmp_path / "bad.json"))
    with pytest.raises(TypeError, match="cannot save field `metadata.model`: object is not a number"):
        smap._replace(metadata=dict(smap.metadata, model=object())).save(str(tmp_path / "bad.json"))
    assert not (tmp_path / "bad.json").exists()


def test_saving_through_a_symbolic_link_replaces_its_target(tmp_path):
    smap, path = saved_map(tmp_path)
    link = tmp_path / "current.json"
    link.symlink_to(path)
    smap._replace(metadata=dict(smap.metadata, note="second")).save(str(link))
    assert link.is_symlink() and so.load_schedule_map(str(path)).metadata["note"] == "second"


# --- 6. Custom sampler steps ------------------------------------------------------------

TS = so.uniform_schedule(VP, 5)
X_T = np.zeros((4, 1))


def returns_x(score, process, x, t_cur, t_next, rng):
    return x


def returns_float_nfe(score, process, x, t_cur, t_next, rng):
    return x, 1.0


def returns_wrong_shape(score, process, x, t_cur, t_next, rng):
    return x[:2], 1


def returns_a_list(score, process, x, t_cur, t_next, rng):
    return x.tolist(), 1


def five_arguments(score, process, x, t_cur, t_next):
    return x, 1


@pytest.mark.parametrize("step, error, message", [
    (five_arguments, TypeError, r"`predictor` `five_arguments` does not take the step's arguments"),
    (returns_x, TypeError, r"the step `returns_x` returned ndarray where \(x, nfe\) was expected"),
    (returns_float_nfe, TypeError, r"the step `returns_float_nfe` returned nfe = 1.0; it must be a non-negative integer"),
    (returns_wrong_shape, TypeError, r"the step `returns_wrong_shape` returned shape \(2, 1\) for x; expected"),
    (returns_a_list, TypeError, "the step `returns_a_list` returned list for x"),
])
def test_a_step_that_breaks_the_contract_is_named(step, error, message):
    score = exact(BIMODAL, VP)
    with pytest.raises(error, match=message):
        sm.sample(score, VP, TS, X_T, 0, predictor=step)
    if step is not five_arguments:
        with pytest.raises(error, match=message):
            sm.flow_error_cost(score, VP, 0.5, 0.4, BIMODAL.sample(40, 0), 0, step=step)


# --- 7. Flags must be booleans ----------------------------------------------------------

not_bool = st.one_of(st.sampled_from(["no", "False", "True", "", "0"]), st.integers(0, 2), st.none(),
                     st.floats(0, 1))


@given(not_bool)
def test_a_flag_that_is_not_a_boolean_is_refused(value):
    score = exact(BIMODAL, VP)
    table_process = so.process_from_alphas_cumprod(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 100)))
    calls = [
        ("denoise", lambda: sm.sample(score, VP, TS, X_T, 0, denoise=value)),
        ("merge", lambda: so.to_timesteps(table_process, so.uniform_schedule(table_process, 5), merge=value)),
        ("control_variate", lambda: so.estimate_schedule_map(score, VP, BIMODAL.sample(40, 0), 0, n_grid=4,
                                                             control_variate=value)),
    ]
    for name, call in calls:
        if value is None and name == "control_variate":
            continue                       # None means "on with a budget": documented
        with pytest.raises(TypeError, match=f"`{name}` must be True or False"):
            call()


# --- 8. Faults ------------------------------------------------------------------------

def test_a_save_killed_midway_leaves_the_old_map_and_its_temporary_file_is_removed_next_time(tmp_path):
    smap, path = saved_map(tmp_path)
    before = path.read_text()
    code = ("import os, scoreopt as so\n"
            f"smap = so.load_schedule_map({str(path)!r})\n"
            "def write(f):\n"
            "    f.write(b'{\"format\": ')\n"
            "    f.flush()\n"
            "    os.kill(os.getpid(), 9)\n"
            f"so.write_atomically({str(path)!r}, write)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(so.__file__))))
    killed = subprocess.run([sys.executable, "-c", code], env=env)
    assert killed.returncode == -9
    assert path.read_text() == before
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    smap.save(str(path))
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_a_full_disk_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    smap, path = saved_map(tmp_path)
    before = path.read_text()

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=rf"cannot write `{path}`: No space left on device; the previous file is "
                                      "unchanged") as err:
        so.write_atomically(str(path), full)
    assert err.value.errno == errno.ENOSPC and path.read_text() == before
    assert os.listdir(tmp_path) == ["map.json"]


def test_a_full_disk_during_training_says_which_checkpoint_is_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.npz")
    settings = dict(rng=0, batch_size=8, callback=models.checkpointer(path, every=10))
    models.train(small_params(), BIMODAL, VP, TS, n_steps=20, **settings)
    settings["callback"] = models.checkpointer(path, every=10)
    real = np.savez

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(models.np, "savez", full)
    with pytest.raises(OSError, match=r"could not save the checkpoint at step 30: .*No space left on device.*; the last "
                                      rf"good checkpoint `{path}` \(step 20\) is intact"):
        models.resume(path, small_params(), BIMODAL, VP, TS, n_steps=40, allow_changes=("n_steps",), **settings)
    monkeypatch.setattr(models.np, "savez", real)
    assert models.load_checkpoint(path).step == 20


def test_a_non_finite_corrector_ratio_is_named_not_blamed_on_the_samples():
    with pytest.raises(ValueError, match="`corrector_ratio` must be positive, got nan"):
        sm.sample(exact(BIMODAL, VP), VP, TS, X_T, 0, corrector_steps=1, corrector_ratio=np.nan)
