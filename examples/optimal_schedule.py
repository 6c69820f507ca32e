"""Compute score-optimal schedules from score evaluations alone, and check them.

For Gaussian data N(0, c^2 I_d) under the VE process the optimal schedule is known
in closed form (derived: docs/derivations.md, section 1): Lambda(sigma) = 2 sqrt(d) [asinh(sigma/c) -
sigma/sqrt(c^2 + sigma^2)]. This script estimates the schedule map from a black-box
score (Monte Carlo, dense grid uniform in log nu), prints its length with a
standard error and the largest relative error of its noise levels against the
closed form, then does the same for the mollified Cantor target under vp_linear,
where no closed form exists, and compares the optimised 20-step schedule with the
baselines.

    python examples/optimal_schedule.py
    python examples/optimal_schedule.py --quick     # fewer samples and levels, two Gaussians
"""
import argparse
import sys
import time

import numpy as np
from scipy.optimize import brentq

import models
import scoreopt as so

N_SAMPLES = 4000      # data samples behind each Monte-Carlo estimate
N_GRID = 400          # grid points, uniform in log nu
GAUSSIANS = [(0.1, 1), (0.5, 1), (2.0, 1), (0.5, 8)]     # (c, d) of the data N(0, c^2 I_d)
T = 20                # steps of the Cantor schedule
SEED = 0
QUICK = dict(n_samples=1000, n_grid=100, gaussians=[(0.5, 1), (0.5, 8)])


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and levels, two Gaussians")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else dict(n_samples=N_SAMPLES, n_grid=N_GRID, gaussians=GAUSSIANS)
    # 1. Gaussian data: the map from a black-box score against the closed form.
    gaussian = gaussian_table(cfg, log)
    # 2. The mollified Cantor target: no closed form; the optimised schedule against the baselines.
    cantor = cantor_schedule(cfg, log)
    return {"gaussian": gaussian, "cantor": cantor}


def closed_form_sigmas(c, d, lo, hi, T):
    Lam = lambda s: 2 * np.sqrt(d) * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
    goal = lambda i: Lam(lo) + i / T * (Lam(hi) - Lam(lo))
    levels = [brentq(lambda s: Lam(s) - goal(i), lo, hi, xtol=1e-15) for i in range(T + 1)]
    return np.array(levels), Lam(hi) - Lam(lo)


def gaussian_table(cfg, log):
    process, out = so.ve(), {}
    log("VE process, data N(0, c^2 I_d), schedule map from a black-box score")
    log("| c   | d | Lambda (estimated)  | Lambda (closed form) | max rel. error of sigma_i, T=10 / T=50 | time |")
    log("|-----|---|---------------------|----------------------|----------------------------------------|------|")
    for c, d in cfg["gaussians"]:
        target = models.Gaussian(np.zeros(d), np.full(d, c ** 2))
        start = time.perf_counter()
        smap = so.estimate_schedule_map(lambda x, t: target.score(x, t, process), process,
                                        target.sample(cfg["n_samples"], SEED), SEED + 1, n_grid=cfg["n_grid"])
        seconds = time.perf_counter() - start
        errors = []
        for steps in (10, 50):
            ref, length = closed_form_sigmas(c, d, 0.002, 80.0, steps)
            errors.append(np.max(np.abs(process.sigma(smap.schedule(steps)) / ref - 1)))
        out[c, d] = (smap.length, smap.length_stderr, length, errors)
        log(f"| {c:<3} | {d} | {smap.length:7.3f} +- {smap.length_stderr:.3f}   | {length:7.3f}              "
            f"| {errors[0]:.2%} / {errors[1]:.2%}                          | {seconds:.2f} s |")
    return out


def cantor_schedule(cfg, log):
    process = so.vp_linear()
    target = models.mollified_cantor()
    score = lambda x, t: target.score(x, t, process)
    smap = so.estimate_schedule_map(score, process, target.sample(cfg["n_samples"], SEED), SEED + 1,
                                    n_grid=cfg["n_grid"])
    ts = smap.schedule(T)
    log(f"\nMollified Cantor (8 modes), vp_linear: Lambda = {smap.length:.2f} +- "
        f"{smap.length_stderr:.2f}; each of T = {T} steps costs about (Lambda/T)^2 = "
        f"{smap.cost_per_step(T):.3f}")
    log("optimised t_i: " + np.array2string(ts, precision=4, max_line_width=100))
    log("its nu_i:      " + np.array2string(so.nsr(process, ts), precision=3, max_line_width=100))
    x0 = target.sample(cfg["n_samples"], SEED + 2)
    log("total corrector cost sum_i L_c(t_{i+1}, t_i), Monte Carlo:")
    totals = {}
    for name, sched in [("optimised", ts), ("uniform", so.uniform_schedule(process, T)),
                        ("EDM rho=7", so.edm_schedule(process, T)),
                        ("cosine", so.cosine_schedule(process, T))]:
        costs, _ = so.interval_costs(score, process, sched, x0, SEED + 3)
        totals[name] = costs.sum()
        log(f"  {name:10s} {costs.sum():8.3f}   (max/min step cost {costs.max() / costs.min():8.1f})")
    return totals


if __name__ == "__main__":
    main(sys.argv[1:])
