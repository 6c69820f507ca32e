"""Reliability, third round: a user's model is a guest, processes keep their identity, files always
load, workers die with their parent, messages name what the user passed (docs/guide/reliability.md).

One section per class of problem; each test is a rule with its own cases (hypothesis where a class has
a space of inputs).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial

import numpy as np
import pytest
from hypothesis import given, strategies as st

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
GAUSS = models.Gaussian([0.0, 0.0], [0.25, 1.0])
X0 = GAUSS.sample(400, 0)
ROOT = os.path.dirname(os.path.abspath(so.__file__))          # the folder that holds scoreopt.py, whatever its name


def exact(x, t):
    """The exact score of GAUSS under VP (module level: picklable by reference)."""
    return GAUSS.score(x, t, VP)


def small_state(n_steps=3):
    return models.train(models.init_mlp(0, dim=2, width=8, depth=1), GAUSS, VP, so.uniform_schedule(VP, 5), rng=0,
                        n_steps=n_steps, batch_size=16)


def run_script(code, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- 1. A file is never replaced by one its loader refuses -------------------------------------------

BAD_STATES = {
    "a schedule that does not increase": lambda s: s._replace(ts=s.ts[::-1].copy()),
    "NaN parameters": lambda s: s._replace(params=[(W * np.nan, b) for W, b in s.params]),
    "a NaN Adam moment": lambda s: s._replace(adam=s.adam._replace(m=np.full_like(s.adam.m, np.nan))),
    "an infinite data variance": lambda s: s._replace(data_var=np.full(2, np.inf)),
    "a negative data variance": lambda s: s._replace(data_var=np.full(2, -1.0)),
    "an unknown preconditioning": lambda s: s._replace(preconditioning="none"),
}


@pytest.mark.parametrize("damage", sorted(BAD_STATES))
def test_a_checkpoint_is_never_replaced_by_one_its_loader_refuses(tmp_path, damage):
    path = tmp_path / "run.npz"
    state = small_state()
    models.save_checkpoint(str(path), state)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="its loader would refuse it: field"):
        models.save_checkpoint(str(path), BAD_STATES[damage](state))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["run.npz"]
    assert models.load_checkpoint(str(path)).step == state.step


@given(st.sampled_from(["theta", "adam_v", "data_mean", "ts"]), st.integers(0, 3),
       st.sampled_from([np.nan, np.inf, -np.inf]))
def test_whatever_a_save_accepts_its_loader_loads(tmp_path_factory, field, index, bad):
    # Every state either is refused by save_checkpoint or loads back: there is no third outcome.
    state, path = small_state(1), str(tmp_path_factory.mktemp("ck") / "run.npz")
    if field == "theta":
        W, b = state.params[0]
        W = W.copy()
        W.flat[index] = bad
        state = state._replace(params=[(W, b)] + state.params[1:])
    elif field == "adam_v":
        v = state.adam.v.copy()
        v[index] = bad
        state = state._replace(adam=state.adam._replace(v=v))
    elif field == "data_mean":
        state = state._replace(data_mean=np.where(np.arange(2) == index % 2, bad, 0.0))
    else:
        ts = state.ts.copy()
        ts[index + 1] = bad
        state = state._replace(ts=ts)
    try:
        models.save_checkpoint(path, state)
    except ValueError:
        assert not os.path.exists(path)
    else:
        models.load_checkpoint(path)


def test_a_route_that_returns_a_bad_schedule_or_costs_is_named_before_anything_is_blended():
    ts = so.uniform_schedule(VP, 5)
    reversed_route = lambda score, process, ts, x0, rng: (ts[::-1], np.ones(5), 1.0)
    short_costs = lambda score, process, ts, x0, rng: (ts, np.ones(3), 1.0)
    with pytest.raises(ValueError, match="ts_star returned by `route` <lambda>.*strictly increasing"):
        so.online_update(exact, VP, ts, X0, 0, gamma=0.5, route=reversed_route)
    with pytest.raises(ValueError, match="costs returned by `route` <lambda>.*length 5"):
        so.online_update(exact, VP, ts, X0, 0, gamma=0.5, route=short_costs)
    online = models.OnlineSchedule(every=1, burn_in=1, route=reversed_route, n_samples=20)
    with pytest.raises(ValueError, match="ts_star returned by `route`"):
        models.train(models.init_mlp(0, dim=2, width=8, depth=1), GAUSS, VP, ts, rng=0, n_steps=2, batch_size=8,
                     online=online)


def test_a_map_of_a_model_that_ignores_t_is_warned_of_and_never_saved(tmp_path):
    path = tmp_path / "map.json"
    so.estimate_schedule_map(exact, VP, X0, 0, n_grid=20).save(str(path))
    before = path.read_text()
    with pytest.warns(RuntimeWarning, match="the score does not depend on t"):
        smap = so.estimate_schedule_map(lambda x, t: -x, VP, X0, 0, n_grid=20)
    assert smap.length == 0.0
    with pytest.raises(ValueError, match="its loader would refuse it: `Lambda` must .* not be all zero"):
        smap.save(str(path))
    assert path.read_text() == before


# --- 2. The model's buffers ------------------------------------------------------------------------

def normalises_in_place(x, t):
    out = exact(x, t)
    x *= 0.5                                  # an in-place normalisation of its input
    return out


class StaticBuffer:
    """A score that returns the same output array every call (a preallocated buffer)."""

    def __init__(self):
        self.buffer = None

    def __call__(self, x, t):
        if self.buffer is None or self.buffer.shape != x.shape:
            self.buffer = np.empty(x.shape)
        self.buffer[...] = exact(x, t)
        return self.buffer


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")  # few updates on purpose
@pytest.mark.parametrize("guest", [normalises_in_place, StaticBuffer()], ids=["writes its input", "reuses its output"])
def test_a_model_that_writes_its_input_or_reuses_its_output_changes_nothing(guest):
    plain = so.estimate_schedule_map(exact, VP, X0, 1, n_grid=30)
    smap = so.estimate_schedule_map(guest, VP, X0, 1, n_grid=30)
    np.testing.assert_array_equal(smap.Lambda, plain.Lambda)
    x_T = sm.prior_sample(VP, 50, GAUSS.variance(), 2)
    for predictor in ("heun", "dpmpp_2m"):
        np.testing.assert_array_equal(sm.sample(guest, VP, so.edm_schedule(VP, 6), x_T, 3, predictor=predictor).x,
                                      sm.sample(exact, VP, so.edm_schedule(VP, 6), x_T, 3, predictor=predictor).x)
    np.testing.assert_array_equal(sm.equal_error_schedule(guest, VP, 4, X0, 4, step="heun", max_iter=3).ts,
                                  sm.equal_error_schedule(exact, VP, 4, X0, 4, step="heun", max_iter=3).ts)


def test_an_adapted_model_that_writes_its_input_changes_nothing():
    def eps_model(x, t):
        out = -exact(x, t) * so.as_column(VP.sigma(t))
        x[...] = 0.0
        return out
    score = so.score_from_eps(eps_model, VP)
    x = np.ones((3, 2))
    np.testing.assert_allclose(score(x, 0.5), exact(np.ones((3, 2)), 0.5), rtol=1e-12)
    assert np.all(x == 1.0)


# --- 3. The identity of a process ------------------------------------------------------------------

def test_an_adapter_used_with_another_process_is_refused_naming_both():
    score = so.score_from_eps(lambda x, t: np.zeros_like(x), VE)
    message = r"`score` was built for the process 've\(0.002, 80\)' and is used with 'vp_linear\(0.1, 20\)'"
    x_T = sm.prior_sample(VP, 4, [1.0, 1.0], 0)
    for call in (lambda: sm.sample(score, VP, so.uniform_schedule(VP, 3), x_T, 0),
                 lambda: so.estimate_schedule_map(score, VP, X0, 0, n_grid=20),
                 lambda: so.local_cost(score, VP, [0.5], X0, 0),
                 lambda: sm.equal_error_schedule(score, VP, 3, X0, 0)):
        with pytest.raises(ValueError, match=message):
            call()
    trained = small_state().score(VP)                      # models.ScoreModel records its process too
    with pytest.raises(ValueError, match="was built for the process 'vp_linear"):
        so.corrector_cost(trained, VE, 0.5, 0.4, X0, 0)


def test_a_table_process_is_named_by_its_content_and_a_map_refuses_another_table_of_the_same_length():
    betas = np.linspace(1e-4, 0.02, 1000)
    linear = so.process_from_alphas_cumprod(np.cumprod(1 - betas))
    scaled = so.process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4 ** 0.5, 0.012 ** 0.5, 1000) ** 2))
    assert linear.name != scaled.name and "N=1000" in linear.name
    assert so.process_from_alphas_cumprod(np.cumprod(1 - betas)).name == linear.name
    score = lambda x, t: -x / (linear.s(t) ** 2 * 0.25 + linear.sigma(t) ** 2)
    smap = so.estimate_schedule_map(score, linear, 0.5 * X0[:, :1], 0, n_grid=30)
    assert smap.timesteps(linear, 10)[-1] == 0
    with pytest.raises(ValueError, match="estimated with the process 'alphas_cumprod\\(N=1000, sha256"):
        smap.timesteps(scaled, 10)


def _backwards_sigma(t):
    return 1.0 - t


def test_a_process_written_in_the_other_time_convention_is_refused_saying_which_end_is_the_data():
    backwards = so.Process(so._one, _backwards_sigma, 0.0, 0.99, "backwards")
    with pytest.raises(ValueError, match="increasing from t_min to t_max \\(t = 0 is the data end"):
        so.uniform_schedule(backwards, 4)
    with pytest.raises(ValueError, match="t = 0 is the data end"):
        sm.sample(exact, backwards, np.linspace(0, 0.99, 5), X0, 0)


# --- 4. Estimates that cannot be what they claim ----------------------------------------------------

def test_the_ancestral_error_in_law_names_its_minimum_of_rows():
    with pytest.raises(ValueError, match="`x0` \\(n_samples\\) needs at least 4 rows .* got 3"):
        sm.flow_error_cost(exact, VP, 0.5, 0.4, X0[:3], 0, step="ancestral")
    with pytest.raises(ValueError, match="needs at least 4 rows"):
        sm.equal_error_schedule(exact, VP, 3, X0, 0, step="ancestral", n_samples=3)


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")  # few updates on purpose
def test_data_at_a_scale_the_process_never_reaches_is_warned_of_by_every_rule():
    far = 1e6 * X0
    with pytest.warns(RuntimeWarning, match="data's scale .* above the largest noise-to-signal ratio"):
        so.estimate_schedule_map(lambda x, t: -x / (VP.s(t) ** 2 * 1e12 + VP.sigma(t) ** 2), VP, far, 0, n_grid=20)
    score = lambda x, t: -x / so.as_column(VP.s(t) ** 2 * 1e12 + VP.sigma(t) ** 2)
    with pytest.warns(RuntimeWarning, match="data's scale"):
        sm.equal_error_schedule(score, VP, 3, far, 0, max_iter=1)


class Tensorish:
    """An output that converts through ``__array__`` and whose ``dtype`` is not a NumPy dtype (a tensor)."""

    def __init__(self, array):
        self.array, self.dtype = array, "torch.float16"

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def test_a_half_precision_tensor_is_warned_of_and_boolean_or_integer_outputs_are_refused():
    # The guest hardening is Part II's (guest_score, the adapters, every Part II entry point); Part I's short check
    # refuses a non-float output too, in its own words.
    half = lambda x, t: Tensorish(exact(x, t).astype(np.float16))
    with pytest.warns(RuntimeWarning, match="returns float16, below float32 precision"):
        so.estimate_schedule_map(half, VP, X0, 0, n_grid=20)
    for dtype, kind in ((bool, "booleans"), (np.int64, "integers")):
        model = lambda x, t, dtype=dtype: np.zeros(x.shape, dtype=dtype)
        with pytest.raises(TypeError, match=f"`score` returned {kind}"):
            so.guest_score(model)(X0, 0.5)
        with pytest.raises(TypeError, match=f"`score` returned {np.dtype(dtype)} values"):
            so.corrector_cost(model, VP, 0.5, 0.4, X0, 0)


# --- 5. The oracle and the multistep solver ---------------------------------------------------------

def test_the_oracle_names_a_score_that_is_not_finite_on_a_start_and_one_autograd_cannot_trace():
    bad_level = so.cosine_schedule(VP, 3)[1]
    nan_once = lambda x, t: exact(x, t) * (np.nan if np.ndim(t) == 0 and abs(t - bad_level) < 1e-12 else 1.0)
    with pytest.raises(ValueError, match="non-finite values"):
        sm.coupled_optimal_schedule(nan_once, VP, 3, X0, 0, n_draws=4, reference_steps=10, max_iter=2)
    opaque = lambda x, t: np.array(exact(np.array(x, dtype=float), float(t)))      # autograd cannot see through
    with pytest.raises(TypeError, match="must be differentiable by autograd"):
        sm.coupled_optimal_schedule(opaque, VP, 3, X0, 0, n_draws=4, reference_steps=10, max_iter=2)


def test_dpm_solver_on_levels_that_coincide_to_rounding_takes_a_first_order_step():
    ts = so.edm_schedule(VE, 8)
    close = np.sort(np.append(ts, np.nextafter(ts[4], 1.0)))            # two levels one ulp apart
    x_T = sm.prior_sample(VE, 200, [0.25, 1.0], 0)
    score = lambda x, t: -x / (np.array([0.25, 1.0]) + so.as_column(VE.sigma(t)) ** 2)
    a = sm.sample(score, VE, close, x_T, 0, predictor="dpmpp_2m").x
    b = sm.sample(score, VE, ts, x_T, 0, predictor="dpmpp_2m").x
    assert np.max(np.abs(a - b)) < 1e-9 * np.std(b)          # the step between them is skipped, state and all


# --- 6 and 7. Processes: workers that die with their parent, a start method safe with threads -----

POSIX = pytest.mark.skipif(os.name != "posix", reason="signals and process groups are POSIX")


def descendants(pid):
    """The processes under ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found, todo = found + children, todo + children
    return found


def running(pid):
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard process and /proc are Linux's")
def test_pool_workers_die_with_their_parent_even_in_a_c_call_that_holds_the_gil(tmp_path):
    # ctypes.PyDLL keeps the GIL through the call: the worker's own watchdog thread cannot run, so the
    # workers must be killed from outside (their guard); the forkserver and resource tracker follow.
    pids = tmp_path / "pids"
    script = f"""
        import ctypes, os, numpy as np, scoreopt as so
        def stuck(x, t):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            ctypes.PyDLL(None).sleep(60)
            return -x
        if __name__ == "__main__":
            x0 = np.random.default_rng(0).standard_normal((40, 1))
            so.estimate_schedule_map(stuck, so.ve(), x0, 0, n_grid=20, workers=2)
    """
    (tmp_path / "job.py").write_text(textwrap.dedent(script))
    job = subprocess.Popen([sys.executable, str(tmp_path / "job.py")], env=dict(os.environ, PYTHONPATH=ROOT),
                           cwd=str(tmp_path))
    deadline = time.time() + 60
    while time.time() < deadline and (not pids.exists() or len(set(pids.read_text().split())) < 2):
        time.sleep(0.05)
    family = descendants(job.pid)                      # forkserver, resource tracker, workers, their guards
    assert {int(p) for p in pids.read_text().split()} <= set(family)
    job.send_signal(signal.SIGTERM)                    # a batch scheduler's time limit
    job.wait(timeout=30)
    deadline = time.time() + 3
    while time.time() < deadline and any(map(running, family)):
        time.sleep(0.05)
    left = [p for p in family if running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "processes of the pool outlived their parent"


def killed_at_level_three(x, t):
    if abs(t - 3 / 19) < 1e-3:                         # level 3 of 20 under ve(): t = 3/19
        os.kill(os.getpid(), signal.SIGKILL)          # what the out-of-memory killer does
    return -x / (1.0 + so.ve().sigma(t) ** 2)


@POSIX
def test_a_worker_killed_by_the_system_is_named_by_its_level():
    x0 = np.random.default_rng(0).standard_normal((40, 1))
    with pytest.raises(so.ScoreEvaluationError, match="a worker process died while the map computed levels .* memory") \
            as info:
        so.estimate_schedule_map(killed_at_level_three, VE, x0, 0, n_grid=20, workers=2)
    first, last = map(int, str(info.value).split("levels ")[1].split(":")[0].split(" to "))
    assert first <= 3 <= last


@POSIX
def test_a_model_whose_parent_holds_a_threads_lock_does_not_deadlock_the_pool(tmp_path):
    # The fork hazard without PyTorch: a lock held by a thread of the parent when the pool starts.
    # A forked child inherits it held and blocks forever; forkserver and spawn children import afresh.
    script = """
        import threading, time, numpy as np, scoreopt as so
        LOCK = threading.Lock()
        def score(x, t):
            with LOCK:
                return -x / (0.25 + so.ve().sigma(t) ** 2)
        if __name__ == "__main__":
            threading.Thread(target=lambda: (LOCK.acquire(), time.sleep(600)), daemon=True).start()
            time.sleep(0.2)
            x0 = 0.5 * np.random.default_rng(0).standard_normal((40, 1))
            print(so.estimate_schedule_map(score, so.ve(), x0, 0, n_grid=20, workers=2).length)
    """
    (tmp_path / "job.py").write_text(textwrap.dedent(script))
    out = subprocess.run([sys.executable, str(tmp_path / "job.py")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=str(tmp_path))
    assert out.returncode == 0 and float(out.stdout) > 0, out.stderr[-2000:]


def slow_score(x, t):
    time.sleep(0.4)
    return -x / (1.0 + so.ve().sigma(t) ** 2)


def test_a_pool_that_returns_nothing_for_a_while_says_so(monkeypatch):
    monkeypatch.setattr(so, "STALL_SECONDS", 0.1)
    x0 = np.random.default_rng(0).standard_normal((40, 1))
    with pytest.warns(RuntimeWarning, match="the process pool has returned nothing for 0.1 s"):
        so.estimate_schedule_map(slow_score, VE, x0, 0, n_grid=4, workers=2)


# --- 8. The command line and the messages -----------------------------------------------------------

@pytest.fixture(scope="module")
def map_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "map.json"
    so.estimate_schedule_map(exact, VP, X0, 0, n_grid=30).save(str(path))
    return str(path)


def test_the_command_line_fails_in_one_line_for_a_closed_pipe_a_full_disk_and_an_impossible_n(map_file):
    command = [sys.executable, "-m", "scoreopt", map_file, "-n", "500"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    piped = subprocess.run(" ".join(command) + " | head -c 10", shell=True, capture_output=True, text=True, env=env)
    assert "Traceback" not in piped.stderr and len(piped.stdout) == 10
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            out = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "cannot write the output" in out.stderr
    for n, message in (("1", "`-n` must be >= 2"), ("1000000000000", "do not fit in memory")):
        out = subprocess.run(command[:-1] + [n], capture_output=True, text=True, env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_each_message_names_what_the_user_passed(map_file):
    with pytest.raises(ValueError, match="`step` must be one of .* got 'heum'"):
        sm.equal_error_schedule(exact, VP, 3, X0, 0, step="heum")
    with pytest.raises(ValueError, match="`step` must be deterministic for coupled_error"):
        sm.coupled_error(exact, VP, so.uniform_schedule(VP, 3), X0[:4], X0[:4], step="ancestral")

    def draws_with_normal(score, process, x, t_cur, t_next, rng):
        return x + rng.normal(size=x.shape), 1
    with pytest.raises(TypeError, match="the step called rng.normal; a step draws its noise only as"):
        sm.gaussian_output_law(models.Gaussian([0.0], [1.0]), VP, so.uniform_schedule(VP, 3),
                               predictor=draws_with_normal)
    wrapped = partial(sm.dpmpp_2m_step)
    x_T = sm.prior_sample(VP, 8, GAUSS.variance(), 0)
    np.testing.assert_array_equal(sm.sample(exact, VP, so.edm_schedule(VP, 5), x_T, 0, predictor=wrapped).x,
                                  sm.sample(exact, VP, so.edm_schedule(VP, 5), x_T, 0, predictor="dpmpp_2m").x)
    times = np.array([0.1, 0.2, 0.7, 0.8])
    bad_rows = lambda x, t: np.where(so.as_column(np.asarray(t)) > 0.5, np.nan, -x)
    with pytest.raises(ValueError, match=r"non-finite values at t in \[0.7, 0.8\] \(one time per row\) \(rows \[2, 3\]\)"):
        so.guest_score(bad_rows)(np.ones((4, 2)), times)
    smap = so.load_schedule_map(map_file)
    ddpm = so.process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 50)))
    with pytest.raises(ValueError) as info:
        so.ScheduleMap(*smap[:9], dict(smap.metadata, process=ddpm.name), smap.grid_error).timesteps(ddpm, 49)
    assert "merge" not in str(info.value)


def test_allow_changes_takes_one_name_as_a_string(tmp_path):
    path = str(tmp_path / "run.npz")
    args = (models.init_mlp(0, dim=2, width=8, depth=1), GAUSS, VP, so.uniform_schedule(VP, 5))
    models.train(*args, rng=0, n_steps=4, batch_size=8, callback=models.checkpointer(path, every=2))
    state = models.resume(path, *args, rng=0, n_steps=6, batch_size=8, allow_changes="n_steps")
    assert state.step == 6
    with pytest.raises(ValueError, match="belongs to another run; it differs in n_steps"):
        models.resume(path, *args, rng=0, n_steps=8, batch_size=8)


def test_the_atomic_writer_leaves_the_umask_alone_and_applies_it(tmp_path):
    old = os.umask(0o027)
    try:
        so.write_atomically(str(tmp_path / "a.txt"), "x")
        assert os.umask(0o027) == 0o027                                   # unchanged by the write
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    source = open(so.__file__, encoding="utf-8").read()
    assert "os.umask" not in source


def test_importing_scoreopt_imports_no_statistics_module():
    out = run_script("import sys, scoreopt; print('scipy.stats' in sys.modules, 'concurrent.futures' in sys.modules)")
    assert out.stdout.split()[0] == "False", out.stderr
