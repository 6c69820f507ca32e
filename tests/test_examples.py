"""The examples run end to end in --quick mode and show what they claim (issue: examples).

Each example's ``main(argv, log)`` returns the numbers it prints; the checks below
are the qualitative claims of each example, on those numbers.
"""
import importlib.util
import os
import sys

import numpy as np

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def run_example(name, tmp_path, figures=True):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # so that a process pool can pickle its functions
    spec.loader.exec_module(module)
    lines = []
    out = module.main(["--quick", "--out", str(tmp_path)], log=lines.append)
    text = "\n".join(lines)
    # Figures: written when matplotlib is there, otherwise the script says how to get them.
    if figures and out["figures"]:
        assert all(os.path.getsize(p) > 10_000 and p.endswith(".png") for p in out["figures"])
    elif figures:
        assert "pip install -e '.[examples]'" in text
    return out, text


def test_cantor_linear_schedule_misses_modes_that_the_optimised_one_fills(tmp_path):
    out, text = run_example("cantor", tmp_path)
    exact = out["exact"]
    # With exact scores (the schedule's effect alone), T = 20 ancestral steps:
    assert exact["optimised"]["modes"] == 8 and exact["linear"]["modes"] <= 2
    assert exact["optimised"]["w1"] < 0.5 * exact["linear"]["w1"]
    assert exact["optimised"]["mass"] > exact["linear"]["mass"] + 0.3
    lam, se = exact["Lambda"]
    assert 0 < se < 0.01 * lam
    # The trained models ran with the same budget: with EDM's preconditioning no sample escapes
    # (with noise prediction, 15 of 20,000 did at the default budget: README), and the
    # optimised model is closer to p_0 than the linear one.
    trained = out["trained"]
    assert trained["linear"]["escaped"] == trained["optimised"]["escaped"] == 0
    assert trained["optimised"]["w1"] < trained["linear"]["w1"]
    assert trained["optimised"]["mass"] > trained["linear"]["mass"]
    assert trained["optimised"]["per_level"].score_error.shape == (9,)
    assert "| trained | optimised |" in text and "| exact | linear |" in text and "per noise level" in text


def test_bimodal_online_update_equalises_costs_and_both_routes_are_shown(tmp_path):
    out, text = run_example("bimodal", tmp_path)
    final = out["final"]
    assert set(final) == {"fixed linear", "online, intervals", "online, dense grid"}
    for route in ("online, intervals", "online, dense grid"):
        spread = final[route]["spread"]                 # (seeds, first / last update)
        assert spread.shape == (2, 2) and np.all(spread[:, 1] < 0.05 * spread[:, 0])   # costs move towards equal
    assert final["fixed linear"]["spread"] is None
    # Training curves: one point per evaluation, for every run and seed; error bars over seeds.
    assert all(len(curve) == 2 for curves in out["curves"].values() for curve in curves)
    for r in final.values():
        mean, se = r["score_error"]
        assert mean > 0 and 0 < se < mean and r["per_level"][0].shape == (13,)
    # Exact scores: both optimised schedules beat the linear one in W1.
    w1 = {name: r["w1"] for name, r in out["exact"].items()}
    assert w1["corrector-optimised"] < w1["linear"] and w1["predictor-optimised"] < w1["linear"]
    assert "Reference: mean log p0" in text and "per noise level" in text


def test_gaussian_schedules_recover_the_closed_form_and_the_rho_family(tmp_path):
    out, _ = run_example("gaussian_schedules", tmp_path)
    for r in out["recovery"].values():
        assert r["max_rel_error"] < 0.01
    lam, se, closed = out["Lambda"]
    assert abs(lam - closed) < 4.5 * se
    rho = [out["rho"][a] for a in sorted(out["rho"])]
    assert np.all(np.diff(rho) > 0)          # steeper spectra, larger best-fit rho
    for kl in out["kl"].values():             # exact KL falls with T for every rule
        assert np.all(np.diff(kl) < 0)


def test_pretrained_adapters_agree_and_the_exports_are_usable(tmp_path):
    out, text = run_example("pretrained", tmp_path, figures=False)
    ddpm = [r for key, r in out.items() if isinstance(key, tuple) and key[0] == "DDPM"]
    assert len(ddpm) == 3
    # The same model in three parametrisations gives the same map (same noise, exact adapters).
    lengths = [r["map"].length for r in ddpm]
    np.testing.assert_allclose(lengths, lengths[0], rtol=1e-6)
    for key, r in out.items():
        if isinstance(key, tuple):
            assert r["map"].n_evaluations <= 30_000 and os.path.exists(r["path"])
    # The recommended schedule is no worse than the baselines on the model's own flow.
    coupled = out["coupled"]
    assert coupled["equal local error"] <= 1.2 * min(v for k, v in coupled.items() if k != "equal local error")
    sigmas, steps, times = (out["exports"][k] for k in ("k-diffusion sigmas(11)", "DDPM timesteps(11)", "flow times(11)"))
    assert sigmas.shape == (12,) and sigmas.dtype == np.float32 and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0)
    assert len(steps) == 11 and steps[0] == 999 and steps[-1] == 0 and np.all(np.diff(steps) < 0)
    assert len(times) == 11 and times[0] == 1.0 and np.all(np.diff(times) < 0)
    assert "set_timesteps(sigmas=" in text
