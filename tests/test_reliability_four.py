"""Reliability, fourth round: saves that replace only what they should, loaders that call nothing a file
names, workers that die with their parent whatever they run (docs/guide/reliability.md).

One section per cause, in the order of harm; each test is a rule with its own cases.
"""
import io
import pickle
import re
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
GAUSS = models.Gaussian([0.0, 0.0], [0.25, 1.0])
X0 = GAUSS.sample(400, 0)
ROOT = os.path.dirname(os.path.abspath(so.__file__))          # the folder that holds scoreopt.py
POSIX = pytest.mark.skipif(os.name != "posix", reason="device files, named pipes and signals are POSIX")


def exact(x, t):
    """The exact score of GAUSS under VP (module level: picklable by reference)."""
    return GAUSS.score(x, t, VP)


@pytest.fixture(scope="module")
def smap():
    return so.estimate_schedule_map(exact, VP, X0[:40], 0, n_grid=20)


@pytest.fixture(scope="module")
def state():
    return models.train(models.init_mlp(0, dim=2, width=8, depth=1), GAUSS, VP, so.uniform_schedule(VP, 5), rng=0,
                        n_steps=3, batch_size=16)


def saves(smap, state):
    """Every kind of save, as a function of the path."""
    return {"map": smap.save, "checkpoint": lambda path: models.save_checkpoint(path, state),
            "report": lambda path: so.write_atomically(path, "a report")}


def dead_pid():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# --- 1. A save replaces only a regular file, or creates one ------------------------------------------

def special_files(folder):
    """A folder, a named pipe, a socket and (as root) a copy of /dev/null, each with a test of its kind."""
    made = {"a folder": (folder / "dir", stat.S_ISDIR)}
    os.mkdir(made["a folder"][0])
    made["a named pipe"] = (folder / "fifo", stat.S_ISFIFO)
    os.mkfifo(made["a named pipe"][0])
    made["a socket"] = (folder / "sock", stat.S_ISSOCK)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["a socket"][0]))
    try:                                            # a copy of /dev/null (root, where devices may be made)
        os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made["a character device"] = (folder / "null", stat.S_ISCHR)
    except (PermissionError, AttributeError):
        pass
    return made, server


@POSIX
def test_a_save_refuses_a_folder_a_device_a_pipe_or_a_socket_naming_it_and_replaces_nothing(tmp_path, smap, state):
    made, server = special_files(tmp_path)
    try:
        for kind, (path, is_kind) in made.items():
            for what, save in saves(smap, state).items():
                with pytest.raises(ValueError, match=f"is {kind}: a save replaces only a regular file"):
                    save(str(path))
                assert is_kind(os.lstat(path).st_mode), f"{what} replaced {kind}"
    finally:
        server.close()
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p, _ in made.values())   # no temporary left


@POSIX
def test_a_save_to_a_descriptor_of_this_process_is_refused_not_renamed_over_the_redirected_file(tmp_path, smap):
    # `smap.save("/dev/stdout")` under `> run.log`: /dev/stdout -> /proc/self/fd/1 -> run.log
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        f.write("earlier output\n")
        f.flush()
        for path in (f"/dev/fd/{f.fileno()}", f"/proc/self/fd/{f.fileno()}"):
            if os.path.exists(path):
                with pytest.raises(ValueError, match="is a descriptor of this process"):
                    smap.save(path)
        os.write(f.fileno(), b"later output\n")
    assert log.read_text() == "earlier output\nlater output\n"


@POSIX
def test_a_replaced_file_keeps_its_permission_bits_also_while_it_is_written(tmp_path, smap, state):
    seen = []

    def data(f):
        seen.append(stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        f.write(b"new")
    for mode in (0o600, 0o640, 0o755):
        path = tmp_path / f"file{mode:o}"
        path.write_text("old")
        os.chmod(path, mode)
        so.write_atomically(str(path), data)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode and seen[-1] == mode
        for save in saves(smap, state).values():
            save(str(path))
            assert stat.S_IMODE(os.stat(path).st_mode) == mode


@POSIX
def test_a_read_only_file_is_refused_as_cp_refuses_it_even_for_root(tmp_path, smap, state):
    path = tmp_path / "kept.json"
    path.write_text("mine")
    os.chmod(path, 0o444)
    for save in saves(smap, state).values():
        with pytest.raises(PermissionError, match=r"is read-only \(mode 0444\)"):
            save(str(path))
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["kept.json"]


def test_a_symbolic_link_is_followed_and_the_rules_apply_to_its_target(tmp_path, smap):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    os.chmod(real, 0o600)
    link.symlink_to(real)
    smap.save(str(link))
    assert link.is_symlink() and stat.S_IMODE(os.stat(real).st_mode) == 0o600
    assert so.load_schedule_map(str(real)).length == smap.length
    os.chmod(real, 0o400)
    with pytest.raises(PermissionError, match="real.json` is read-only"):
        smap.save(str(link))


# --- 2. A checkpoint never chooses code to run -------------------------------------------------------

def rewrite_checkpoint(path, **fields):
    with np.load(path) as f:
        arrays = dict(f)
    arrays.update(fields)
    np.savez(path, **arrays)


@pytest.mark.parametrize("name", ["seed", "default_rng", "PCG64DXSM", "__import__", 7])
def test_the_bit_generator_of_a_checkpoint_comes_from_a_fixed_list(tmp_path, state, name):
    path = str(tmp_path / "ck.npz")
    models.save_checkpoint(path, state)
    rng_state = dict(state.rng.bit_generator.state, bit_generator=name)
    rewrite_checkpoint(path, rng_state=np.array(json.dumps(rng_state)))
    before = np.random.get_state()[1].copy()
    with pytest.raises(ValueError, match=r"field `rng_state`: the bit generator must be one of \['MT19937', 'PCG64'"):
        models.load_checkpoint(path)
    np.testing.assert_array_equal(np.random.get_state()[1], before)     # "seed" once reseeded the global RNG
    for kind in sorted(models.BIT_GENERATORS):                          # each of the list loads and continues
        models.save_checkpoint(path, state._replace(rng=np.random.Generator(models.BIT_GENERATORS[kind](1))))
        assert type(models.load_checkpoint(path).rng.bit_generator).__name__ == kind


# --- 3. Every checkpoint field is checked, naming it -------------------------------------------------

def damages(state):
    """(field, new value) pairs that a loader must refuse, each naming the field."""
    with io.BytesIO() as buffer:
        np.savez(buffer, **models._arrays_of(state))
        buffer.seek(0)
        arrays = dict(np.load(buffer))
    theta, shapes = arrays["theta"], arrays["layer_shapes"]
    m, n = shapes[-1]
    relabelled = np.vstack([shapes[:-1], [[m * n + n - 1, 1]]])          # the same size, a layer that does not fit
    return [("step", np.array(-5)), ("step", np.array(10 ** 15)), ("step", np.array(2.0)), ("step", np.array([2])),
            ("adam_step", np.array(-1)), ("adam_step", np.array(99)), ("version", np.array("4")),
            ("theta", theta.astype(complex)), ("theta", theta.astype(int)), ("theta", theta[None]),
            ("layer_shapes", relabelled), ("layer_shapes", shapes.astype(float)), ("layer_shapes", -shapes),
            ("adam_m", arrays["adam_m"].astype(complex)), ("data_mean", np.zeros(3)), ("data_var", np.array([1.0])),
            ("ts", arrays["ts"].astype(complex)), ("ts", np.array(["0", "1"])), ("loss", np.zeros(10)),
            ("update_step", np.array([2, 1])), ("update_step", np.array([1.5])),
            ("preconditioning", np.array(3)), ("run", np.array("[1, 2]")), ("run", np.array("{not json")),
            ("rng_state", np.array(json.dumps({"bit_generator": "PCG64", "state": "no"})))]


def test_every_checkpoint_field_is_checked_for_type_range_and_consistency_naming_it(tmp_path, state):
    path = str(tmp_path / "ck.npz")
    for field, value in damages(state):
        models.save_checkpoint(path, state)
        rewrite_checkpoint(path, **{field: value})
        with pytest.raises(ValueError, match=f"is not a valid checkpoint: .*`{field}`"):
            models.load_checkpoint(path)


# --- 7. The sweep of leftover temporaries removes only a writer's own -------------------------------

def test_the_temporary_sweep_keeps_users_files_and_cannot_overflow(tmp_path, smap):
    dead = dead_pid()
    keep = [f".map.json.{10 ** 19}.abcd1234.tmp",           # a pid of 20 digits: once a raw OverflowError
            f".map.json.{dead}.backup.tmp",                  # a user's file: not the writer's pattern
            f".map.json.{dead}.abcd1234.tmp.orig", f".map.json.0{dead}.abcd1234.tmp",
            f".map.json.{os.getpid()}.abcd1234.tmp"]        # a live writer's (this process)
    for name in keep:
        (tmp_path / name).write_text("mine")
    (tmp_path / f".map.json.{dead}.abcd1234.tmp.d").mkdir()
    (tmp_path / f".map.json.{dead}.0123abcd.tmp").write_text("half a save")   # a killed writer's: removed
    smap.save(str(tmp_path / "map.json"))
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [f".map.json.{dead}.abcd1234.tmp.d", "map.json"])


# --- 8. Loaders read regular files only, and not too much -------------------------------------------

def load_within(load, path, seconds=5.0):
    """``load(path)``'s exception, or a failure if it has not returned within ``seconds`` (a reader blocked
    on a named pipe is released by opening its other end)."""
    out = []

    def run():
        try:
            load(path)
            out.append(None)
        except Exception as err:
            out.append(err)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"{load.__name__} blocked on {path}")
    return out[0]


@POSIX
def test_the_loaders_and_the_command_line_refuse_a_pipe_a_device_and_a_folder_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((str(fifo), "a named pipe"), ("/dev/zero", "a character device"), (str(tmp_path), "a folder")):
        for load in (so.load_schedule_map, models.load_checkpoint):
            err = load_within(load, path)
            assert isinstance(err, ValueError) and f"is {kind}, not a regular file" in str(err), err
        assert so.main([path, "-n", "5"]) == 2
        assert f"is {kind}, not a regular file" in capsys.readouterr().err


def test_a_file_over_the_size_limit_is_refused_naming_the_limit(tmp_path, smap, state, monkeypatch):
    smap.save(str(tmp_path / "map.json"))
    models.save_checkpoint(str(tmp_path / "ck.npz"), state)
    monkeypatch.setattr(so, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match="is larger than 1,000 bytes"):
        so.load_schedule_map(str(tmp_path / "map.json"))
    with pytest.raises(ValueError, match="is larger than 1,000 bytes"):
        models.load_checkpoint(str(tmp_path / "ck.npz"))


# --- 9. A broken pool names its cause ----------------------------------------------------------------

class LoadsOnlyHere:
    """A score that pickles here and fails to load in any other process (as one defined under the script's
    `if __name__ == "__main__":` does)."""

    def __init__(self):
        self.pid = os.getpid()

    def __reduce__(self):
        return _load_in, (self.pid,)

    def __call__(self, x, t):
        return exact(x, t)


def _load_in(pid):
    if os.getpid() != pid:
        raise AttributeError("Can't get attribute 'score' on <module '__mp_main__'>")
    return LoadsOnlyHere()


def test_a_score_the_workers_cannot_load_is_named():
    # A pool task is the level's function pickled, loaded in the worker (so._call_pickled); here the
    # "other process" is simulated by the pid the score records (checked by hand with a pool: the same).
    score = LoadsOnlyHere()
    score.pid = -1
    with pytest.raises(TypeError, match="a worker process could not load the score .* outside `if __name__"):
        so._call_pickled(pickle.dumps(score), (0, X0[:4], 0.5, 1.0))


class Exited:
    def __init__(self, code):
        self.exitcode = code

    def join(self, timeout=None):
        pass


def test_a_pool_started_while_a_worker_imports_the_script_and_each_exit_code_are_named(monkeypatch):
    # a script without `if __name__ == "__main__":` starts a pool again in every worker, which imports it
    monkeypatch.setattr(so.multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match="put the script's top-level code under `if __name__ == '__main__':`"):
        so.estimate_schedule_map(exact, VP, X0[:40], 0, n_grid=20, workers=2)
    monkeypatch.undo()
    cause = lambda *codes: so._broken_pool_cause([Exited(c) for c in codes])
    assert "top-level code is not under `if __name__" in cause(1, -15)
    assert "killed by SIGKILL (often by the system for lack of memory" in cause(-9, -15)
    assert "memory" not in cause(-6) and "SIGABRT" in cause(-6)
    # 255 is what a worker reports when its status cannot be read from the forkserver
    # (multiprocessing.popen_forkserver): the forkserver is gone (checked by hand: killing the forkserver of a
    # running map gives this message), or, with the forkserver alive, the status was lost
    monkeypatch.setattr(so, "_process_alive", lambda pid: False)
    import multiprocessing.forkserver
    monkeypatch.setattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", 12345, raising=False)
    assert "the forkserver that starts and watches the workers was killed" in cause(255, 0)
    monkeypatch.setattr(so, "_process_alive", lambda pid: True)
    assert "status was lost" in cause(255, -15) and "memory" in cause(255, -15)
    assert "killed by SIGKILL" in cause(255, -9, -15)


# --- 5. A hand-made FlowWeight is checked wherever it is accepted; data near the float limits ---------

def test_a_hand_made_flow_weight_is_checked_naming_the_field():
    x0 = X0[:64]
    good = sm.flow_weight(x0)
    bad = {"weight.kind": good._replace(kind="sample"), "weight.basis": good._replace(basis=2 * good.basis),
           "weight.basis` must be a finite (d, k)": good._replace(basis=good.basis[:1]),
           "weight.variances": good._replace(variances=good.variances[:1]),
           "weight.variances` must be 2 finite values >= 0": good._replace(variances=np.array([np.nan, 1.0])),
           "weight.rest": good._replace(rest=-1.0)}
    calls = (lambda w: sm.flow_error_cost(exact, VP, 0.5, 0.4, x0, 0, weight=w),
             lambda w: sm.equal_error_schedule(exact, VP, 2, x0, 0, weight=w, max_iter=1),
             lambda w: sm.teacher_schedule(exact, VP, 2, x0, 0, weight=w, n_cells=4))
    for field, weight in bad.items():
        for call in calls:
            with pytest.raises(ValueError, match=re.escape(f"`{field}")):
                call(weight)
    with pytest.raises(ValueError, match="`weight.variances`"):           # once blamed `nu`
        sm.flow_error_cost(exact, VP, 0.5, 0.4, x0, 0, weight=good._replace(variances=-good.variances))


@pytest.mark.parametrize("scale", [1e154, 1e-310])
def test_data_whose_squares_overflow_or_underflow_is_refused_naming_the_scale(scale):
    x0 = X0[:40] * scale
    words = "overflow" if scale > 1 else "underflow"
    for call in (lambda: sm.flow_weight(x0), lambda: sm.equal_error_schedule(exact, VP, 2, x0, 0, max_iter=1),
                 lambda: so.estimate_schedule_map(exact, VP, x0, 0, n_grid=20)):
        with pytest.raises(ValueError, match=f"`x0` holds values of magnitude up to .*their squares {words}"):
            call()


# --- 6. A process is identified by what it computes ---------------------------------------------------

def test_a_process_is_its_name_and_what_it_computes():
    ve = so.ve()
    renamed = so.Process(ve.s, ve.sigma, ve.t_min, ve.t_max, "my_ve")    # the same values, another name
    assert so.same_process(ve, so.ve()) and so.same_process(ve, ve)
    assert so.process_digest(renamed) == so.process_digest(ve) and not so.same_process(ve, renamed)
    assert not so.same_process(ve, so.ve(sigma_max=81.0))
    score = so.score_from_eps(lambda x, t: np.zeros_like(x), ve)
    with pytest.raises(ValueError, match="built for the process 've\\(0.002, 80\\)' and is used with 'my_ve'"):
        so.local_cost(score, renamed, [0.5], X0[:8], 0)


def test_two_custom_processes_of_the_default_name_are_told_apart():
    import autograd.numpy as anp
    narrow = so.Process(lambda t: anp.ones_like(t), lambda t: 10.0 * t + 0.01, 0.0, 1.0)   # both named "process"
    wide = so.Process(lambda t: anp.ones_like(t), lambda t: 80.0 * t + 0.01, 0.0, 1.0)
    score = so.score_from_eps(lambda x, t: np.zeros_like(x), narrow)
    x_T = sm.prior_sample(wide, 8, 1.0, 0)
    with pytest.raises(ValueError, match="built for the process 'process' and is used with another process named "
                                         "'process' \\(s or sigma differ\\)"):
        sm.sample(score, wide, so.uniform_schedule(wide, 4), x_T, 0)
    twin = so.Process(lambda t: anp.ones_like(t), lambda t: 10.0 * t + 0.01, 0.0, 1.0)   # the same, built again
    sm.sample(score, twin, so.uniform_schedule(twin, 4), sm.prior_sample(twin, 8, 1.0, 0), 0)
    assert so.process_digest(narrow) == so.process_digest(twin) != so.process_digest(wide)


def test_a_map_records_its_process_digest_and_refuses_another_process_of_its_name(tmp_path):
    flow = so.flow_matching()
    smap = so.estimate_schedule_map(lambda x, t: -x / (t ** 2 + (1 - t) ** 2), flow, X0[:40], 0, n_grid=20)
    assert smap.metadata["process_digest"] == so.process_digest(flow)
    impostor = flow._replace(s=lambda t: 1.0 - 0.5 * t)                  # the same name, another s
    with pytest.raises(ValueError, match="another process named 'flow_matching.*the process digests differ"):
        smap.flow_times(impostor, 5)
    smap.flow_times(so.flow_matching(), 5)


# --- 10. Minor causes, each a clear error ------------------------------------------------------------

@pytest.fixture
def map_json(tmp_path, smap):
    """The saved map as JSON, and a function that writes an edited copy and returns its path."""
    path = tmp_path / "map.json"
    smap.save(str(path))
    data = json.loads(path.read_text())

    def edited(text=None, **fields):
        out = tmp_path / "edited.json"
        out.write_text(text if text is not None else json.dumps(dict(data, **fields)))
        return str(out)
    return data, edited


def test_a_hand_edited_map_is_refused_naming_the_field(map_json, capsys):
    data, edited = map_json
    huge = json.dumps(data).replace('"length_stderr": ', '"length_stderr": 1' + "0" * 400 + ', "x": ', 1)
    with pytest.raises(ValueError, match=r"`length_stderr` must be a finite number, got 1000.*\.\.\.$"):
        so.load_schedule_map(edited(huge))                          # once a raw OverflowError
    with pytest.raises(ValueError, match="`Lambda` must be a finite 1-D array"):
        so.load_schedule_map(edited(json.dumps(data).replace('"Lambda": [', '"Lambda": [1' + "0" * 400 + ", ", 1)))
    deep = dict(data["metadata"], notes=json.loads("[" * 900 + "]" * 900))
    with pytest.raises(ValueError, match="`metadata` is nested more than 32 levels deep"):
        so.load_schedule_map(edited(metadata=deep))                 # once loaded, and could not be saved
    for N in (10 ** 12, -1, True):                                  # the CLI once printed timesteps of 10**12
        path = edited(metadata=dict(data["metadata"], n_timesteps=N))
        assert so.main([path, "-n", "5", "--convention", "diffusers-timesteps"]) == 2
        assert "`metadata.n_timesteps` must be the length of the table" in capsys.readouterr().err


def test_the_command_line_escapes_what_a_file_or_an_argument_holds(map_json, capsys, tmp_path):
    data, edited = map_json
    path = edited(metadata=dict(data["metadata"], process="\x1b[2J\x1b]0;owned\x07vp"))
    assert so.main([path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/map\xff.json")       # not UTF-8: a surrogate escape
    os.rename(path, odd)
    assert so.main([odd]) == 0 and "map\\xff.json" in capsys.readouterr().out
    assert so.main([odd, "-n", str(10 ** 30)]) == 2
    assert "`-n` 1000000000000000000000000000000 levels do not fit in memory" in capsys.readouterr().err


def test_the_oracle_blames_the_score_only_for_what_autograd_cannot_trace():
    def draws(score, process, x, t_cur, t_next, rng):         # a custom step that draws noise
        return x + rng.standard_normal(x.shape), 1
    with pytest.raises(ValueError, match="the step draws noise: `step` of coupled_optimal_schedule"):
        sm.coupled_optimal_schedule(exact, VP, 2, X0[:8], 0, step=draws, n_draws=4, reference_steps=4)

    def raises(x, t):
        raise KeyError("a missing weight")
    with pytest.raises(so.ScoreEvaluationError, match="`score` raised KeyError"):
        sm.coupled_optimal_schedule(raises, VP, 2, X0[:8], 0, n_draws=4, reference_steps=4)


# --- 11. Regressions found by the earlier audits ---------------------------------------------------

def test_module_constants_are_checked_where_they_are_used(monkeypatch):
    monkeypatch.setattr(so, "MAP_GROUPS", 1)
    with pytest.raises(ValueError, match="`scoreopt.MAP_GROUPS` must be >= 2"):
        so.estimate_schedule_map(exact, VP, X0[:40], 0, n_grid=20)
    monkeypatch.setattr(models, "MAX_LOSS_RATIO", -1)
    with pytest.raises(ValueError, match="`models.MAX_LOSS_RATIO` must be above 1"):
        models.train(models.init_mlp(0, dim=2, width=4, depth=1), GAUSS, VP, so.uniform_schedule(VP, 3), rng=0,
                     n_steps=1, batch_size=4)


def test_a_map_without_its_process_refuses_to_export_timesteps(map_json):
    data, edited = map_json
    table = so.process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 100)))
    metadata = {k: v for k, v in data["metadata"].items() if k not in ("process", "process_digest")}
    smap = so.load_schedule_map(edited(metadata=metadata))
    with pytest.raises(ValueError, match="this map does not record its process"):
        smap.timesteps(table, 5)
    assert len(smap.sigmas(5)) == 6                                # its sigmas still work (5 levels, then 0)


def test_a_pool_object_passed_as_workers_is_pointed_to_its_map():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(TypeError, match=r"`workers` is a ThreadPoolExecutor; pass its map method \(workers=pool"):
            so.estimate_schedule_map(exact, VP, X0[:40], 0, n_grid=20, workers=pool)
        assert so.estimate_schedule_map(exact, VP, X0[:40], 0, n_grid=20, workers=pool.map).length > 0


def test_flow_log_density_names_a_stochastic_predictor():
    x_T = np.linspace(-2.0, 2.0, 8)[:, None]
    with pytest.raises(ValueError, match="`predictor` 'ancestral' draws noise"):
        sm.flow_log_density(lambda x, t: -x, so.ve(), so.uniform_schedule(so.ve(), 3), x_T, lambda x: -x[:, 0] ** 2,
                            predictor="ancestral")


def test_custom_levels_beyond_the_range_and_float16_sigmas_that_collapse_are_refused(smap):
    beyond = lambda ts, n, rng, process: np.full(n, process.t_max + 0.5)
    with pytest.raises(ValueError, match=r"`levels` <lambda> must return 4 real times in \[t_min, t_max\]"):
        models.train(models.init_mlp(0, dim=2, width=4, depth=1), GAUSS, VP, so.uniform_schedule(VP, 3), rng=0,
                     n_steps=1, batch_size=4, levels=beyond)
    with pytest.raises(ValueError, match="`dtype` float16 cannot hold these 20001 levels apart"):
        smap.sigmas(20000, dtype=np.float16)
    assert np.all(np.diff(smap.sigmas(10, dtype=np.float16)) < 0)
