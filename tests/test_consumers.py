"""Schedules for n model calls in each consumer's own terms: exports and the consumers' defaults.

A schedule for ``n`` model calls is ``ts``, ``n`` increasing call levels, then the sampler's step
to 0. The first half runs everywhere: exact values of the exports, their shapes and final zeros,
the FlowMatch shift round trip, and each consumer's default schedule against its formula written
out here from the consumer's source (diffusers 0.42.1, k-diffusion 0.1.1). The second half samples
with the consumer's own scheduler and with ``sampler.sample`` on the same levels, the same exact
model (Gaussian data, so the model is the closed form) and the same noise, and skips, saying what
is missing, where torch, diffusers or k-diffusion is not installed.
"""
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

import models
import sampler as sm
import scoreopt as so

N = 1000
TABLE = so.process_from_alphas_cumprod(np.cumprod(1.0 - np.linspace(1e-4, 0.02, N)))   # diffusers' "linear"
VE, FLOW, WIDE = so.ve(), so.flow_matching(), so.flow_matching(1e-4, 0.999)
TARGET = models.Gaussian([0.3, -0.5, 0.1], [0.25, 0.5, 1.0])


def levels_of(ts):
    """``ts`` as the integers ``k`` of the table, ``t = k / (N - 1)``."""
    return np.rint(np.asarray(ts) * (N - 1)).astype(int)


# --------------------------------------------------------------------------------
# Exports: exact values, shapes, the final zero
# --------------------------------------------------------------------------------

def test_to_sigmas_gives_n_levels_then_zero_with_the_lowest_level_free():
    ts = np.array([0.2, 0.5, 0.9])                  # neither t_min nor t_max: the ends are the schedule's
    sigmas = so.to_sigmas(VE, ts)
    np.testing.assert_array_equal(sigmas, np.append(so.nsr(VE, ts)[::-1], 0.0))
    assert sigmas.shape == (4,) and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)
    assert so.to_sigmas(VE, [0.5]).tolist() == [float(so.nsr(VE, 0.5)), 0.0]     # one call: straight to 0
    assert so.to_sigmas(VE, ts, dtype=np.float32).dtype == np.float32


def test_diffusers_exports_are_the_call_levels_in_each_schedulers_terms():
    k = np.array([99, 250, 600, 999])
    ts = k / (N - 1)
    assert so.to_diffusers(TABLE, ts, "DPMSolverMultistepScheduler") == {"timesteps": [999, 600, 250, 99]}
    euler = so.to_diffusers(TABLE, ts, "EulerDiscreteScheduler")["sigmas"]       # n + 1: it appends no 0
    assert len(euler) == 5 and euler[-1] == 0.0
    np.testing.assert_array_equal(euler, so.to_sigmas(TABLE, ts))
    flow = so.to_diffusers(FLOW, [0.1, 0.4, FLOW.t_max], "FlowMatchEulerDiscreteScheduler", shift=1.0)
    np.testing.assert_allclose(flow["sigmas"], [1.0, 0.4, 0.1], rtol=0, atol=1e-15)   # it appends the 0


@given(shift=st.floats(0.25, 12.0), levels=st.lists(st.floats(0.01, 0.98), min_size=1, max_size=12, unique=True))
def test_flowmatch_sigmas_shifted_by_the_scheduler_are_the_exported_times(shift, levels):
    # diffusers maps custom sigmas u to shift u / (1 + (shift - 1) u); the export is the inverse.
    ts = np.sort(levels)
    u = np.array(so.to_diffusers(FLOW, ts, "FlowMatchEulerDiscreteScheduler", shift=shift)["sigmas"])
    assert np.all((u > 0) & (u < 1)) and np.all(np.diff(u) < 0)
    np.testing.assert_allclose(shift * u / (1 + (shift - 1) * u), ts[::-1], rtol=1e-12)


def test_flow_exports_start_at_one_where_the_schedule_starts_at_t_max():
    # nu(t_max) = 80 stands in for pure noise; flow pipelines start at t = 1 (x = eps).
    ts = np.array([0.3, FLOW.t_max])
    assert so.to_diffusers(FLOW, ts, "FlowMatchEulerDiscreteScheduler", shift=3.0)["sigmas"][0] == 1.0
    assert so.to_comfyui(FLOW, ts).startswith("1, ")
    below = so.to_diffusers(FLOW, [0.3, 0.9], "FlowMatchEulerDiscreteScheduler", shift=1.0)["sigmas"]
    assert below[0] == pytest.approx(0.9, abs=1e-15)


def comfyui_reads(text):
    """ComfyUI's ManualSigmas node parses its string with this pattern (comfy_extras/nodes_custom_sampler.py)."""
    return [float(v) for v in re.findall(r"[-+]?(?:\d*\.*\d+)", text)]


@pytest.mark.parametrize("process", [so.ve(1e-5, 80.0), TABLE, FLOW], ids=["ve-1e-5", "table", "flow"])
def test_comfyui_string_reads_back_exactly_with_comfyuis_own_pattern(process):
    ts = so.consumer_schedules(process, 7, **({"shift": 3.0} if process is FLOW else {}))[
        "shifted" if process is FLOW else "karras"]
    text = so.to_comfyui(process, ts)
    assert "e" not in text                           # 1e-05 would read as 1 and -5
    read = comfyui_reads(text)
    expected = (so.to_diffusers(FLOW, ts, "FlowMatchEulerDiscreteScheduler", shift=1.0)["sigmas"] + [0.0]
                if process is FLOW else so.to_sigmas(process, ts).tolist())
    assert read == expected and read[-1] == 0.0 and len(read) == 8


def test_snap_to_table_moves_levels_to_the_nearest_timestep_and_round_trips():
    ts = np.array([0.0004, 0.1003, 0.4999, 1.0])
    snapped = so.snap_to_table(TABLE, ts)
    np.testing.assert_array_equal(levels_of(snapped), [0, 100, 499, 999])
    np.testing.assert_array_equal(snapped * (N - 1), np.rint(snapped * (N - 1)))     # on the table's points
    np.testing.assert_array_equal(so.snap_to_table(TABLE, snapped), snapped)         # idempotent
    np.testing.assert_array_equal(so.to_timesteps(TABLE, snapped), so.to_timesteps(TABLE, ts))
    close = np.array([0.5, 0.5002, 0.9])
    with pytest.raises(ValueError, match="same timestep"):
        so.snap_to_table(TABLE, close)
    with pytest.warns(RuntimeWarning, match="2 of 3 levels remain"):
        np.testing.assert_array_equal(levels_of(so.snap_to_table(TABLE, close, merge=True)), [500, 899])


# --------------------------------------------------------------------------------
# The consumers' defaults against their formulas, written out from their source
# --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 10, 25, 50])
def test_table_defaults_are_diffusers_spacings(n):
    got = {name: levels_of(ts) for name, ts in so.consumer_schedules(TABLE, n).items()
           if name in ("linspace", "leading", "leading_dpm", "trailing")}
    i = np.arange(n)
    # DPMSolverMultistepScheduler "linspace": n + 1 points from 0 to N - 1, rounded, without the 0
    np.testing.assert_array_equal(got["linspace"], np.round((i + 1) * (N - 1) / n))
    # DDIMScheduler "leading": i * (N // n) + steps_offset
    np.testing.assert_array_equal(got["leading"], i * (N // n))
    offset = levels_of(so.consumer_schedules(TABLE, n, steps_offset=1)["leading"])
    np.testing.assert_array_equal(offset, i * (N // n) + 1)
    # DPMSolverMultistepScheduler "leading": (1 .. n) * (N // (n + 1)) + steps_offset: its top call below N - 1
    np.testing.assert_array_equal(got["leading_dpm"], (i + 1) * (N // (n + 1)))
    # "trailing": N - i N / n, rounded, minus 1; its top call is timestep N - 1
    np.testing.assert_array_equal(got["trailing"], np.sort(np.round(N - i * N / n) - 1))
    assert got["trailing"][-1] == N - 1


def test_eulers_linspace_calls_at_timestep_zero_with_nu_linear_between_the_tables_points():
    ts = so.consumer_schedules(TABLE, 6)["linspace_to_0"]
    k = np.linspace(0, N - 1, 6)                                   # 0, 199.8, ...: floats
    nu_table = so.nsr(TABLE, np.arange(N) / (N - 1))
    lo = np.floor(k).astype(int)
    hi = np.minimum(lo + 1, N - 1)
    expected = nu_table[lo] + (k - lo) * (nu_table[hi] - nu_table[lo])
    np.testing.assert_allclose(so.nsr(TABLE, ts), expected, rtol=1e-12)
    assert ts[0] == 0.0 and ts[-1] == 1.0


@pytest.mark.parametrize("process", [VE, so.vp_linear(), TABLE], ids=["ve", "vp_linear", "table"])
@pytest.mark.parametrize("n", [2, 4, 10])
def test_karras_and_exponential_are_k_diffusions_formulas(process, n):
    nu_min, nu_max = so.nsr_range(process)
    schedules = so.consumer_schedules(process, n)
    ramp = np.arange(n)[::-1] / (n - 1)                 # get_sigmas_karras: from sigma_max down, rho = 7
    karras = (nu_max ** (1 / 7) + ramp[::-1] * (nu_min ** (1 / 7) - nu_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(so.nsr(process, schedules["karras"])[::-1], karras, rtol=1e-9)
    assert schedules["karras"][0] == process.t_min and schedules["karras"][-1] == process.t_max
    if process.n_timesteps == 0:                         # get_sigmas_exponential: uniform in log sigma
        np.testing.assert_allclose(so.nsr(process, schedules["exponential"]), np.geomspace(nu_min, nu_max, n),
                                   rtol=1e-9)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("n", [2, 4, 10, 28])
def test_flow_default_is_flowmatch_schedulers_shifted_uniform_schedule(shift, n):
    # FlowMatchEulerDiscreteScheduler: its sigma_min is the shifted 1/N; set_timesteps(n) spaces n
    # sigmas uniformly from 1 to sigma_min and shifts them once more.
    shifted = lambda u: shift * u / (1 + (shift - 1) * u)
    process = so.flow_matching(1e-4, 0.999)               # 1/N = 1e-3 inside; 28 levels of shift 6 below t_max
    expected = shifted(np.linspace(1.0, shifted(1.0 / N), n))
    ts = so.consumer_schedules(process, n, shift=shift)["shifted"]
    assert ts[-1] == process.t_max                        # its t = 1, exported back as 1
    np.testing.assert_allclose(ts[::-1][1:], expected[1:], rtol=1e-12)
    exported = so.to_diffusers(process, ts, "FlowMatchEulerDiscreteScheduler", shift=shift)["sigmas"]
    np.testing.assert_allclose(shifted(np.array(exported)), expected, rtol=1e-12)


def test_consumer_schedules_choose_by_the_kind_of_process():
    assert sorted(so.consumer_schedules(TABLE, 4)) == ["karras", "leading", "leading_dpm", "linspace", "linspace_to_0",
                                                       "trailing"]
    assert sorted(so.consumer_schedules(VE, 4)) == ["exponential", "karras"]
    assert sorted(so.consumer_schedules(FLOW, 4, shift=3.0)) == ["shifted"]
    for process, kw in ((TABLE, {}), (VE, {}), (FLOW, {"shift": 3.0})):
        for name, ts in so.consumer_schedules(process, 6, **kw).items():
            assert ts.shape == (6,) and np.all(np.diff(ts) > 0), name
            assert process.t_min <= ts[0] and ts[-1] <= process.t_max, name


# --------------------------------------------------------------------------------
# Bad input: errors that name the argument
# --------------------------------------------------------------------------------

def fake_scheduler(name, **config):
    """A stand-in with a diffusers scheduler's class name and config (the exports are duck-typed)."""
    return type(name, (), {"config": config})()


@pytest.mark.parametrize("call, error, match", [
    (lambda: so.to_diffusers(TABLE, [0.5], "DDIMScheduler"), ValueError, "solver_order=1"),
    (lambda: so.to_diffusers(TABLE, [0.5], "UniPCMultistepScheduler"), ValueError, "`scheduler` must be one of"),
    (lambda: so.to_diffusers(VE, [0.5], "DPMSolverMultistepScheduler"), ValueError, "process_from_alphas_cumprod"),
    (lambda: so.to_diffusers(VE, [0.5], "EulerDiscreteScheduler"), ValueError, "process_from_alphas_cumprod"),
    (lambda: so.to_diffusers(TABLE, [0.5], "FlowMatchEulerDiscreteScheduler", shift=3.0), ValueError,
     "flow_matching"),
    (lambda: so.to_diffusers(FLOW, [0.5], "FlowMatchEulerDiscreteScheduler"), ValueError, "`shift` is needed"),
    (lambda: so.to_diffusers(FLOW, [0.5], "FlowMatchEulerDiscreteScheduler", shift=-1.0), ValueError, "`shift`"),
    (lambda: so.to_diffusers(TABLE, [0.5], "DPMSolverMultistepScheduler", shift=3.0), ValueError, "`shift`"),
    (lambda: so.to_diffusers(TABLE, [0.5, 0.2], "DPMSolverMultistepScheduler"), ValueError,
     "`ts` must be strictly increasing"),
    (lambda: so.to_diffusers(TABLE, [0.5, 1.2], "EulerDiscreteScheduler"), ValueError, "`ts` must lie in"),
    (lambda: so.to_diffusers(TABLE, [0.5, 0.5002], "DPMSolverMultistepScheduler"), ValueError, "same timestep"),
    (lambda: so.to_diffusers(FLOW, [0.5], fake_scheduler("FlowMatchEulerDiscreteScheduler",
                                                           use_dynamic_shifting=True)), ValueError, r"exp\(mu\)"),
    (lambda: so.to_diffusers(FLOW, [0.5], fake_scheduler("FlowMatchEulerDiscreteScheduler", shift_terminal=0.1),
                             shift=3.0), ValueError, "shift_terminal"),
    (lambda: so.to_diffusers(TABLE, [0.5], fake_scheduler("DPMSolverMultistepScheduler",
                                                            final_sigmas_type="sigma_min")), ValueError,
     "final_sigmas_type"),
    (lambda: so.to_sigmas(VE, [0.5], dtype=int), TypeError, "`dtype`"),
    (lambda: so.to_comfyui(VE, []), ValueError, "`ts` must be a 1-D array of at least 1"),
    (lambda: so.snap_to_table(VE, [0.5]), ValueError, "process_from_alphas_cumprod"),
    (lambda: so.snap_to_table(TABLE, [0.5], merge="yes"), TypeError, "`merge`"),
    (lambda: so.consumer_schedules(VE, 0), ValueError, "`n`"),
    (lambda: so.consumer_schedules(VE, 4.0), TypeError, "`n` must be an integer"),
    (lambda: so.consumer_schedules(VE, 4, shift=3.0), ValueError, "`shift` applies to a flow_matching"),
    (lambda: so.consumer_schedules(FLOW, 4), ValueError, "`shift` is needed"),
    (lambda: so.consumer_schedules(TABLE, 4, steps_offset=-1), ValueError, "`steps_offset`"),
    (lambda: so.consumer_schedules(TABLE, 4, steps_offset=300), ValueError, "steps_offset"),
    (lambda: so.consumer_schedules(TABLE, 1001), ValueError, "not n distinct timesteps"),
    (lambda: so.consumer_schedules(so.flow_matching(t_max=0.5), 10, shift=6.0), ValueError, "flow_matching"),
])
def test_bad_input_is_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------
# Parity: the consumer's own sampler and ours, same levels, same model, same noise
# --------------------------------------------------------------------------------

def sample_levels(process, ts, x_T, predictor, rng=0):
    """``sampler.sample`` from ``x_T`` at ``ts[-1]`` through the call levels ``ts`` and the final step to 0
    (Tweedie's denoiser at ``ts[0]``: the Euler step to nu = 0), on the process restricted to the levels."""
    levels = process._replace(t_min=float(ts[0]), t_max=float(ts[-1]))
    return sm.sample(lambda x, t: TARGET.score(x, t, process), levels, ts, x_T, rng, predictor=predictor,
                     denoise=True)


def x_top(process, ts, n=64, seed=3):
    return sm.prior_sample(process._replace(t_max=float(ts[-1])), n, TARGET.var, seed)


def eps_model(torch, process):
    """The exact epsilon of the Gaussian data as a diffusers model of integer or float timesteps."""
    def model(x, timestep):
        t = float(timestep) / (process.n_timesteps - 1)
        eps = -float(process.sigma(t)) * TARGET.score(x.double().numpy(), t, process)
        return torch.as_tensor(eps, dtype=x.dtype)
    return model


def run_diffusers(torch, scheduler, model, x, scale_input=False):
    calls = 0
    for k in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, k) if scale_input else x
        x, calls = scheduler.step(model(x_in, k), k, x).prev_sample, calls + 1
    return x.double().numpy(), calls


PARITY = {}          # largest absolute difference per case, printed with -s


def agree(theirs, ours, case, atol):
    diff = float(np.max(np.abs(theirs - ours)))
    PARITY[case] = diff
    print(f"{case}: max |diff| = {diff:.2e}")
    assert diff < atol, f"{case}: {diff:.3g}"


@pytest.mark.parametrize("spacing", ["trailing", "snapped karras"])
@pytest.mark.parametrize("n", [4, 10])
def test_dpmsolver_2m_with_exported_timesteps_is_our_dpmpp_2m(spacing, n):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    scheduler = diffusers.DPMSolverMultistepScheduler()          # dpmsolver++, order 2, final sigma 0
    process = so.process_from_alphas_cumprod(scheduler.alphas_cumprod.numpy())
    ts = so.consumer_schedules(process, n)["trailing"] if spacing == "trailing" else \
        so.snap_to_table(process, so.consumer_schedules(process, n)["karras"], merge=True)
    scheduler.set_timesteps(**so.to_diffusers(process, ts, scheduler))
    x_T = x_top(process, ts)
    theirs, calls = run_diffusers(torch, scheduler, eps_model(torch, process), torch.as_tensor(x_T))
    ours = sample_levels(process, ts, x_T, "dpmpp_2m")
    assert calls == ours.nfe == len(ts)
    agree(theirs, ours.x, f"DPMSolverMultistep 2M {spacing} n={n}", 1e-5)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_ddim_is_dpmsolver_order_one_and_euler_sigmas_and_our_euler(spacing, offset):
    # DDIMScheduler takes no custom timesteps; its own spacings equal consumer_schedules' (n = 10
    # divides N, so its stride N // n is the spacing's), and DPMSolverMultistep(solver_order=1) on the
    # exported timesteps, EulerDiscrete on the exported sigmas and our Euler are the same DDIM.
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    n = 10
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing=spacing, steps_offset=offset)
    process = so.process_from_alphas_cumprod(ddim.alphas_cumprod.numpy())
    ts = so.consumer_schedules(process, n, steps_offset=offset)[spacing]
    ddim.set_timesteps(n)
    assert ddim.timesteps.tolist() == so.to_timesteps(process, ts).tolist()
    model, x_T = eps_model(torch, process), x_top(process, ts)
    theirs, calls = run_diffusers(torch, ddim, model, torch.as_tensor(x_T))
    dpm1 = diffusers.DPMSolverMultistepScheduler(solver_order=1)
    dpm1.set_timesteps(**so.to_diffusers(process, ts, dpm1))
    first_order, _ = run_diffusers(torch, dpm1, model, torch.as_tensor(x_T))
    euler = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(**so.to_diffusers(process, ts, euler))
    assert len(euler.timesteps) == n and len(euler.sigmas) == n + 1      # the 0 is ours: it appends none
    y_T = torch.as_tensor(x_T / float(process.s(ts[-1])))        # its state is x / s (k-diffusion's)
    by_sigmas, _ = run_diffusers(torch, euler, model, y_T, scale_input=True)
    ours = sample_levels(process, ts, x_T, "euler")
    assert calls == ours.nfe == n
    agree(theirs, ours.x, f"DDIM {spacing} offset {offset}", 1e-5)
    agree(first_order, ours.x, f"DPMSolverMultistep order 1 {spacing} offset {offset}", 1e-5)
    agree(by_sigmas, ours.x, f"EulerDiscrete sigmas {spacing} offset {offset}", 1e-5)


def test_euler_discretes_own_default_and_karras_are_consumer_schedules():
    pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    for n in (4, 6, 10):
        for name, config in (("linspace_to_0", {}), ("karras", {"use_karras_sigmas": True})):
            euler = diffusers.EulerDiscreteScheduler(**config)
            process = so.process_from_alphas_cumprod(euler.alphas_cumprod.numpy())
            euler.set_timesteps(n)
            expected = so.to_sigmas(process, so.consumer_schedules(process, n)[name])
            np.testing.assert_allclose(euler.sigmas.numpy(), expected, rtol=2e-6, err_msg=f"{name} n={n}")
        dpm = diffusers.DPMSolverMultistepScheduler()
        dpm.set_timesteps(n)                                         # its default spacing, "linspace"
        linspace = so.consumer_schedules(process, n)["linspace"]
        assert dpm.timesteps.tolist() == so.to_timesteps(process, linspace).tolist()
        dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing="leading")
        dpm.set_timesteps(n)
        leading = so.consumer_schedules(process, n)["leading_dpm"]
        assert dpm.timesteps.tolist() == so.to_timesteps(process, leading).tolist()
        for spacing in ("leading", "trailing"):
            own = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
            own.set_timesteps(n)
            expected = so.to_sigmas(process, so.consumer_schedules(process, n)[spacing])
            np.testing.assert_allclose(own.sigmas.numpy(), expected, rtol=2e-6, err_msg=f"{spacing} n={n}")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [4, 6, 10])
def test_flowmatch_scheduler_uses_the_exported_times_and_its_default_is_ours(shift, n):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    own = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)    # its lowest level, shift 1: 1/N < FLOW.t_min
    own.set_timesteps(n)
    given = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    default = so.consumer_schedules(WIDE, n, shift=shift)["shifted"]
    given.set_timesteps(**so.to_diffusers(WIDE, default, given))
    np.testing.assert_allclose(given.sigmas.numpy(), own.sigmas.numpy(), atol=1e-6)   # its default, round trip
    # a schedule exported without pre-unshifting moves towards noise (issue 29: 1.4x the coupled error)
    raw = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    raw.set_timesteps(sigmas=so.to_diffusers(WIDE, default, "FlowMatchEulerDiscreteScheduler", shift=1.0)["sigmas"])
    if shift != 1.0:
        assert np.all(raw.sigmas.numpy()[1:-1] > own.sigmas.numpy()[1:-1] + 1e-3)
    # sampling: Euler in flow time is DDIM, our Euler; the model is the exact velocity u = eps - x0
    ts = np.sort(np.append(default[:-1], 0.95))                     # a top level below t_max: both start there
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(**so.to_diffusers(WIDE, ts, scheduler))
    np.testing.assert_allclose(scheduler.sigmas.numpy()[:-1], ts[::-1], rtol=1e-6)

    def velocity(x, timestep):
        t = float(timestep) / N
        x64 = x.double().numpy()
        score = TARGET.score(x64, t, WIDE)
        eps, x0 = -t * score, (x64 + t ** 2 * score) / (1 - t)
        return torch.as_tensor(eps - x0, dtype=x.dtype)
    x_T = x_top(WIDE, ts)
    theirs, calls = run_diffusers(torch, scheduler, velocity, torch.as_tensor(x_T))
    ours = sample_levels(WIDE, ts, x_T, "euler")
    assert calls == ours.nfe == n
    agree(theirs, ours.x, f"FlowMatchEuler shift {shift} n={n}", 2e-5)


@pytest.mark.parametrize("predictor, sampler_name, calls", [
    ("euler", "sample_euler", lambda n: n), ("heun", "sample_heun", lambda n: 2 * n - 1),
    ("dpmpp_2m", "sample_dpmpp_2m", lambda n: n), ("ancestral", "sample_euler_ancestral", lambda n: n)])
@pytest.mark.parametrize("n", [4, 10])
def test_k_diffusion_samplers_on_the_exported_sigmas_are_ours(predictor, sampler_name, calls, n):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    try:
        from k_diffusion import sampling
    except Exception as err:            # ImportError, or a missing dependency inside k-diffusion's __init__
        pytest.skip(f"k-diffusion is not importable ({type(err).__name__}: {err})")
    ts = so.consumer_schedules(VE, n)["karras"]
    counted = []

    def denoiser(y, sigma):             # E[x0 | y] for the Gaussian data under VE (s = 1)
        counted.append(1)
        var = torch.as_tensor(TARGET.var)
        mean = torch.as_tensor(TARGET.mean())
        return mean + var * (y - mean) / (var + sigma[:, None] ** 2)
    noise = np.random.default_rng(11)   # the ancestral step's draws, in our order
    x_T = x_top(VE, ts)
    theirs = getattr(sampling, sampler_name)(
        denoiser, torch.as_tensor(x_T), torch.as_tensor(so.to_sigmas(VE, ts)), disable=True,
        **({"noise_sampler": lambda s, s_next: torch.as_tensor(noise.standard_normal(x_T.shape))}
           if predictor == "ancestral" else {}))
    ours = sample_levels(VE, ts, x_T, predictor, rng=11)
    assert len(counted) == ours.nfe == calls(n)
    agree(theirs.numpy(), ours.x, f"k-diffusion {sampler_name} n={n}", 1e-9)


@pytest.mark.parametrize("n", [2, 4, 10])
def test_k_diffusions_own_karras_and_exponential_are_consumer_schedules(n):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    try:
        from k_diffusion import sampling
    except Exception as err:
        pytest.skip(f"k-diffusion is not importable ({type(err).__name__}: {err})")
    nu_min, nu_max = so.nsr_range(VE)
    ours = so.consumer_schedules(VE, n)
    for name, theirs in (("karras", sampling.get_sigmas_karras(n, nu_min, nu_max)),
                         ("exponential", sampling.get_sigmas_exponential(n, nu_min, nu_max))):
        np.testing.assert_allclose(theirs.double().numpy(), so.to_sigmas(VE, ours[name]), rtol=2e-6, atol=0,
                                   err_msg=name)


def test_euler_discrete_timesteps_on_snapped_levels_are_integers_to_float32_rounding():
    # EulerDiscrete turns sigmas into timesteps by interpolating log sigma in float32: on the table's
    # points they come out within 3.1e-5 of the integer (measured), so a model that looks its timestep
    # up must round it, not truncate it; DPMSolverMultistep(solver_order=1) passes the integers.
    pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    euler = diffusers.EulerDiscreteScheduler()
    process = so.process_from_alphas_cumprod(euler.alphas_cumprod.numpy())
    for n in (4, 6, 10, 20):
        for name, ts in so.consumer_schedules(process, n).items():
            snapped = so.snap_to_table(process, ts, merge=True)
            euler.set_timesteps(**so.to_diffusers(process, snapped, euler))
            np.testing.assert_allclose(euler.timesteps.numpy(), so.to_timesteps(process, snapped), rtol=0,
                                       atol=1e-4, err_msg=f"{name} n={n}")


def test_the_guides_diffusers_snippet_runs_as_written(capsys):
    with open("docs/guide/your-model.md", encoding="utf-8") as f:
        code = re.search(r"For a diffusers model:\n\n```python\n(.*?)```", f.read(), re.S).group(1)
    exec(compile(code, "your-model.md", "exec"), {})
    assert capsys.readouterr().out.startswith("[999, 899, 799, 699, 599, 499, 399, 299, 199, 99]\n")


def test_a_scheduler_instance_of_another_table_or_shift_is_refused():
    pytest.importorskip("torch", reason="PyTorch is not installed")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    scaled = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(ValueError, match="has the table alphas_cumprod"):
        so.to_diffusers(TABLE, [0.5], scaled)            # Stable Diffusion's table, diffusers' linear process
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        so.to_diffusers(TABLE, [0.5], diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True))
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="differs from the scheduler's own shift 3"):
        so.to_diffusers(FLOW, [0.5], flow, shift=1.0)
    assert so.to_diffusers(FLOW, [0.5], flow) == so.to_diffusers(FLOW, [0.5], flow, shift=3.0)
