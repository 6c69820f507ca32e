"""The calls benchmark (examples/benchmarks/calls_benchmark.py, issue 29 part 5) at toy scale.

Three tiny models (a DDPM epsilon-MLP, a rectified-flow MLP, image_benchmark's U-Net on 8x8 patches), a
few training steps each, one call count: the whole pipeline runs, every schedule goes through the
consumer's own sampler with exactly the stated model calls, and the exports are what each consumer
uses (checked against the consumer's own arithmetic). Skips where PyTorch, diffusers, k-diffusion or
scikit-image is not installed (none is a dependency).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the calls benchmark needs PyTorch")
pytest.importorskip("diffusers", reason="the calls benchmark needs diffusers")
pytest.importorskip("skimage", reason="the calls benchmark needs scikit-image")
try:                                    # k-diffusion can fail on import in other ways (pkg_resources, torchvision)
    import k_diffusion.sampling  # noqa: F401  (imported to skip where it fails)
except Exception as err:
    pytest.skip(f"the calls benchmark needs k-diffusion ({type(err).__name__}: {err})", allow_module_level=True)

import scoreopt as so
from oracles import load_benchmark


def load():
    return load_benchmark("calls_benchmark")


@pytest.fixture(scope="module")
def module():
    return load()


def tiny(module, cache):
    cfg = module.settings(["--quick", "--cache", str(cache)])
    train = dict(steps=20, batch_size=32, lr=2e-3, ema=0.9)
    cfg.update(calls=(4,), n_samples=32, n_x0=100, n_train=700, n_held_out=140, map_budget=1000, rule_budget=3000,
               reference=dict(ve=16, ddpm=40, flow=40), patch=dict(ddpm=4, flow=4, ve=8),
               mlp=dict(width=32, depth=2, emb=16), ve_model=dict(channels=(8, 16), patch=2, emb=16),
               train=dict(ddpm=train, flow=train, ve=dict(train, warmup=5)))
    return cfg


# The toy budget stops today's equal-error rule after an update or two, on purpose.
@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge:RuntimeWarning")
def test_tiny_calls_benchmark_runs_every_schedule_through_the_consumer_with_n_calls(module, tmp_path):
    cfg = tiny(module, tmp_path)
    assert not cfg["write_docs"]
    lines = []
    out = module.run(cfg, log=lines.append)
    assert set(out["families"]) == {"ddpm", "flow", "ve"}
    for family, res in out["families"].items():
        assert (tmp_path / f"quick_{family}.pt").exists()
        done = [r for r in res["rows"] if "error" not in r]
        assert {r["kind"] for r in done} == {"default", "baseline", "library"}
        for r in done:
            # n model calls exactly; Heun on n/2 levels makes n - 1 (its last step to 0 is Euler's).
            assert r["calls"] == (r["n_calls"] - 1 if r["sampler"] == "heun" else r["n_calls"]), r
            assert np.isfinite(r["coupled"]) and r["coupled"] > 0 and np.isfinite(r["sliced_w1"])
            assert len(r["per_draw"]) == res["reference"]["n"] and r["stderr"] > 0
        # Each library schedule has n call levels inside the process's range, t_min not among them.
        for (sampler, n_calls, rule), ts in res["found"].items():
            levels = n_calls // 2 if sampler == "heun" else n_calls
            assert len(ts) == levels and np.all(np.diff(ts) > 0), (family, rule, ts)
        # The rows of issue 29's calls say why they are missing, or ran.
        for name, attr in (("rule (n calls)", "equal_error_calls"), ("recommended", "recommended_schedule")):
            rows = [r for r in res["rows"] if r["rule"] == name]
            assert rows and all(("error" in r) == (getattr(module.sm, attr, None) is None) for r in rows)
    # DDIMScheduler is DPMSolverMultistep(solver_order=1) on its own timesteps where they are consistent
    # ("leading", and "trailing" at 10 steps of 1000: DDIM steps to t - 100); "linspace" steps to t - 100
    # from 999 too, not to its next timestep 888, so it differs.
    check = out["families"]["ddpm"]["ddim_check"]
    for spacing in ("leading", "trailing"):
        assert check[spacing]["dpm1"] < 1e-3 * max(1.0, check[spacing]["scale"]), check
    report = (tmp_path / "quick_calls.md").read_text()
    assert report == out["report"]
    for family in ("(a)", "(b)", "(c)"):
        assert f"## {family}" in report
    assert "| lib edm7 |" in report and "## Summary" in report
    # The model is reused, not trained again.
    again = []
    module.cached_model("ddpm", cfg, again.append)
    assert "loaded" in again[0]


def test_flow_sigmas_survive_diffusers_shift(module):
    """FlowMatchEuler applies its shift 3 t / (1 + 2 t) to custom sigmas too: what it ends up with is the
    schedule exported, top level at 1 (the prior), and a final 0."""
    process = so.flow_matching()
    ts = np.array([0.05, 0.2, 0.5, 0.8, process.t_max])
    scheduler = module.FlowMatchEulerDiscreteScheduler(shift=module.FLOW_SHIFT)
    scheduler.set_timesteps(sigmas=module.flow_sigmas(process, ts).tolist())
    np.testing.assert_allclose(scheduler.sigmas.numpy(), [1.0, 0.8, 0.5, 0.2, 0.05, 0.0], rtol=1e-6, atol=1e-7)


def test_exports_are_the_consumers_own_levels(module):
    """Timesteps k = round(t (N - 1)) descending give DPMSolverMultistep exactly those timesteps and the table's
    nu there; Euler sigmas nu(ts) give EulerDiscrete timesteps t (N - 1) (its log-sigma interpolation is
    the table process's log-SNR interpolation)."""
    sched = module.DDPMScheduler(num_train_timesteps=1000)
    process = so.process_from_alphas_cumprod(sched.alphas_cumprod.numpy())
    ts = np.array([0.1003, 0.3, 0.61, 1.0])
    dpm = module.DPMSolverMultistepScheduler.from_config(sched.config)
    dpm.set_timesteps(timesteps=module.table_timesteps(process, ts))
    assert dpm.timesteps.tolist() == [999, 609, 300, 100]
    nu = np.sqrt((1 - sched.alphas_cumprod.numpy()) / sched.alphas_cumprod.numpy())
    np.testing.assert_allclose(dpm.sigmas.numpy(), list(nu[[999, 609, 300, 100]]) + [0.0], rtol=1e-5)
    euler = module.EulerDiscreteScheduler.from_config(sched.config)
    euler.set_timesteps(sigmas=module.kdiff_sigmas(process, ts).tolist())
    np.testing.assert_allclose(euler.timesteps.numpy(), ts[::-1] * 999, rtol=1e-4)
    with pytest.raises(ValueError, match="same timestep"):
        module.table_timesteps(process, np.array([0.1, 0.1001, 1.0]))


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge:RuntimeWarning")
def test_a_plugged_in_recommended_call_gets_model_calls_and_its_rows_run(module, tmp_path, monkeypatch):
    """The row of issue 29's call: `sampler.recommended_schedule(score, process, n_calls, x0, rng, step=, shift=)`
    is asked for the sampler's model calls (Heun: 2m - 1 for m levels) and its `.ts` (m call levels) runs
    through the consumer with that many calls; its `.n_evaluations` is the row's cost."""
    asked = []

    def fake(score, process, n_calls, x0, rng, *, step, shift):
        asked.append((step, n_calls))
        levels = (n_calls + 1) // 2 if step == "heun" else n_calls
        return so.EqualCostResult(so.loglinear_schedule(process, levels)[1:], None, None, True, 0, [], 7)

    monkeypatch.setattr(module.sm, "recommended_schedule", fake, raising=False)
    cfg = dict(tiny(module, tmp_path), families=("ve", "ddpm"))
    out = module.run(cfg, log=lambda *args: None)
    assert sorted(asked) == sorted([("euler", 4), ("heun", 3), ("dpmpp_2m", 4), ("dpmpp_2m", 4), ("euler", 4),
                                    ("euler", 4)])
    rows = [r for res in out["families"].values() for r in res["rows"] if r["rule"] == "recommended"]
    assert len(rows) == 6 and all("error" not in r and r["evaluations"] == 7 for r in rows)
    assert all(r["calls"] == (3 if r["sampler"] == "heun" else 4) for r in rows)
    assert "| recommended | " in out["report"]
