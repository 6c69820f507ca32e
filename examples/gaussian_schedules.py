"""Gaussian data: the optimised schedule recovers schedules found by manual search.

The paper's observation that score-optimal schedules resemble hand-tuned ones, on data
whose every quantity is exact. VE process on EDM's
range (sigma from 0.002 to 80).

(a) Data N(0, c^2 I): the schedule estimated from score evaluations alone
    (`estimate_schedule_map` on a black-box score) against the closed form
    Lambda(sigma) = 2 sqrt(d) [asinh(sigma/c) - sigma/sqrt(c^2 + sigma^2)] (derived,
    docs/derivations.md, section 1).
(b) Data N(0, diag(lambda_k)), lambda_k = k^-alpha, d = 64: the optimised schedule
    (exact local cost, `gaussian_local_cost`) and the EDM rho whose schedule fits it
    best (least squares in log nu at T = FIT_T), for several alpha: how rho moves with
    the spectrum.
(c) A steps sweep, T = 5 ... 100: the exact KL(sampler output || p_{t_min})
    (`gaussian_output_law`, no Monte-Carlo error) of the optimised schedule against
    EDM rho = 3, 7, 100 and log-linear, for the Euler (DDIM), Heun (EDM) and ancestral
    samplers, on the alpha = 1 spectrum (the spirit of the paper's Tables 2-3).

    python examples/gaussian_schedules.py           # about 15 s
    python examples/gaussian_schedules.py --quick   # about 5 s
"""
import argparse
import os
import sys
import time

import numpy as np
from scipy.optimize import minimize_scalar

import models
import sampler as sm
import scoreopt as so

C, D_ISO = 0.5, 8                       # (a): data N(0, C^2 I_D_ISO)
N_SAMPLES, N_GRID = 4000, 400           # (a): samples and grid of the black-box estimate
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # (b): spectrum exponents
DIM = 64                                # (b), (c): dimension of the spectrum
FIT_T = 40                              # (b): steps at which rho is fitted
STEPS = (5, 10, 20, 50, 100)            # (c)
SAMPLERS = ("euler", "heun", "ancestral")
QUICK = dict(alphas=(0.0, 1.0, 2.0), steps=(5, 10, 20), n_samples=2000, n_grid=200)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "gaussian_schedules")


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer spectra, steps and samples")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else dict(alphas=ALPHAS, steps=STEPS, n_samples=N_SAMPLES, n_grid=N_GRID)
    begin = time.perf_counter()
    process = so.ve()

    # (a) The schedule map estimated from a black-box score, against the closed form.
    rec, (Lam, Lam_se, Lam_closed) = recovery(process, cfg["n_samples"], cfg["n_grid"], args.seed)
    log(f"(a) N(0, {C}^2 I_{D_ISO}), VE on EDM's range: estimated from {cfg['n_samples']} samples on "
        f"{cfg['n_grid']} levels, Lambda = {Lam:.3f} ± {Lam_se:.3f} (closed form {Lam_closed:.3f})")
    log("| T | max relative error of sigma_i against the closed form |\n|---|---|")
    for T, r in rec.items():
        log(f"| {T} | {100 * r['max_rel_error']:.2f}% |")

    # (b) The optimised schedule for each spectrum, and the EDM rho that fits it best.
    fits = {}
    for alpha in cfg["alphas"]:
        ts = optimised_schedule(process, spectrum(alpha), FIT_T)
        fits[alpha] = (*fit_rho(process, ts), process.sigma(ts))
    log(f"\n(b) N(0, diag(k^-alpha)), d = {DIM}: EDM rho fitted to the optimised {FIT_T}-step schedule")
    log("| alpha | best-fit rho | rms misfit in log nu |\n|---|---|---|")
    for alpha, (rho, misfit, _) in fits.items():
        log(f"| {alpha:g} | {rho:.2f} | {misfit:.3f} |")

    # (c) Exact KL of every schedule, sampler and T.
    table = steps_sweep(process, spectrum(1.0), cfg["steps"])
    log(f"\n(c) Exact KL(output || p_tmin), N(0, diag(k^-1)), d = {DIM}, VE; * marks the best in its column")
    log("| sampler | schedule | " + " | ".join(f"T = {T}" for T in cfg["steps"]) + " |")
    log("|---|---|" + "---|" * len(cfg["steps"]))
    for sampler_name in SAMPLERS:
        names = [n for s, n in table if s == sampler_name]
        best = [min(names, key=lambda n: table[sampler_name, n][j]) for j in range(len(cfg["steps"]))]
        for name in names:
            cells = [f"{v:.3g}{'*' if best[j] == name else ''}" for j, v in enumerate(table[sampler_name, name])]
            log(f"| {sampler_name} | {name} | " + " | ".join(cells) + " |")

    figures = plot(process, rec, fits, table, cfg["steps"], args.out, log)
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return {"recovery": rec, "Lambda": (Lam, Lam_se, Lam_closed), "rho": {a: f[0] for a, f in fits.items()},
            "kl": table, "figures": figures}


# --------------------------------------------------------------------------------
# (a) recovery, (b) the rho fit, (c) the steps sweep; the figures
# --------------------------------------------------------------------------------

def closed_form_schedule(process, T, c, d):
    """sigma_i with equal steps of the closed-form Lambda (docs/derivations.md, section 1), mapped to times."""
    Lam = lambda s: 2 * np.sqrt(d) * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
    grid = np.geomspace(0.002, 80.0, 200_001)
    levels = np.interp(np.linspace(Lam(grid[0]), Lam(grid[-1]), T + 1), Lam(grid), grid)
    return levels


def recovery(process, n_samples, n_grid, seed):
    """(a) The black-box estimate against the closed form, T = 10, 18 and 50."""
    target = models.Gaussian(np.zeros(D_ISO), np.full(D_ISO, C ** 2))
    score = lambda x, t: target.score(x, t, process)
    smap = so.estimate_schedule_map(score, process, target.sample(n_samples, seed), seed + 1, n_grid=n_grid)
    out = {}
    for T in (10, 18, 50):
        est, exact = process.sigma(smap.schedule(T)), closed_form_schedule(process, T, C, D_ISO)
        out[T] = {"estimated": est, "closed": exact, "edm7": process.sigma(so.edm_schedule(process, T, 7.0)),
                  "max_rel_error": float(np.max(np.abs(est / exact - 1)))}
    Lam_closed = 2 * np.sqrt(D_ISO) * ((np.arcsinh(80 / C) - 80 / np.sqrt(C ** 2 + 80 ** 2))
                                       - (np.arcsinh(0.002 / C) - 0.002 / np.sqrt(C ** 2 + 0.002 ** 2)))
    return out, (smap.length, smap.length_stderr, Lam_closed)


def spectrum(alpha):
    return np.arange(1, DIM + 1, dtype=float) ** -alpha


def optimised_schedule(process, lam, T):
    grid = so.loglinear_schedule(process, 4000)
    return so.optimal_schedule(grid, so.gaussian_local_cost(process, grid, lam), T)


def fit_rho(process, ts):
    """The EDM rho whose schedule is closest to ``ts`` in log nu (least squares)."""
    T, target = len(ts) - 1, np.log(so.nsr(process, ts))
    misfit = lambda rho: np.mean((np.log(so.nsr(process, so.edm_schedule(process, T, rho))) - target) ** 2)
    best = minimize_scalar(misfit, bounds=(1.0, 100.0), method="bounded", options={"xatol": 1e-3})
    return float(best.x), float(np.sqrt(best.fun))


def steps_sweep(process, lam, steps):
    """(c) Exact KL to p_{t_min} for every schedule, sampler and T."""
    target = models.Gaussian(np.zeros(DIM), lam)
    goal = target.marginal(process, process.t_min)
    rules = {"optimised (corrector)": lambda T: optimised_schedule(process, lam, T),
             "edm rho=3": lambda T: so.edm_schedule(process, T, 3.0),
             "edm rho=7": lambda T: so.edm_schedule(process, T, 7.0),
             "edm rho=100": lambda T: so.edm_schedule(process, T, 100.0),
             "log-linear": lambda T: so.loglinear_schedule(process, T)}
    # Sampler-aware schedules (README, "Which schedule for which sampler") go here as
    # further rules, so that they are measured on the same footing.
    table = {}
    for sampler_name in SAMPLERS:
        for name, rule in rules.items():
            table[sampler_name, name] = [sm.gaussian_kl(*sm.gaussian_output_law(target, process, rule(T), predictor=sampler_name),
                                                        goal.mean(), goal.var) for T in steps]
    return table


def plot(process, rec, fits, table, steps, out, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("\nmatplotlib is not installed: no figures (pip install -e '.[examples]' for them)")
        return []
    os.makedirs(out, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    r = rec[18]
    i = np.arange(19)
    axes[0].semilogy(i, r["closed"], "k-", lw=2, label="closed form")
    axes[0].semilogy(i, r["estimated"], "o", ms=4, color="tab:blue", label="estimated from scores")
    axes[0].semilogy(i, r["edm7"], "--", color="tab:gray", label="EDM rho = 7")
    axes[0].set_xlabel("step i (0 = data end)")
    axes[0].set_ylabel(r"$\sigma_i$")
    axes[0].set_title(f"(a) N(0, {C}$^2$ I$_{D_ISO}$), T = 18")
    axes[0].legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for k, (alpha, (rho, _, sig)) in enumerate(fits.items()):
        color = cmap(k / max(1, len(fits) - 1))
        axes[1].semilogy(np.arange(FIT_T + 1), sig, "-", color=color, label=f"alpha {alpha:g}: rho {rho:.1f}")
        axes[1].semilogy(np.arange(FIT_T + 1), process.sigma(so.edm_schedule(process, FIT_T, rho)), ":",
                         color=color)
    axes[1].set_xlabel("step i")
    axes[1].set_ylabel(r"$\sigma_i$")
    axes[1].set_title(f"(b) spectrum k$^{{-\\alpha}}$, d = {DIM}: optimised (solid), best EDM (dotted)")
    axes[1].legend(fontsize=7)
    alphas = list(fits)
    axes[2].plot(alphas, [fits[a][0] for a in alphas], "o-")
    axes[2].set_xlabel(r"spectrum exponent $\alpha$")
    axes[2].set_ylabel(r"best-fit EDM $\rho$")
    axes[2].set_title("(b) the hand-tuned rho family, recovered")
    paths.append(_save(fig, out, "a_b_recovery_and_rho.png", plt))

    fig, axes = plt.subplots(1, len(SAMPLERS), figsize=(5 * len(SAMPLERS), 4))
    for ax, sampler_name in zip(axes, SAMPLERS):
        for (s, name), kl in table.items():
            if s == sampler_name:
                ax.loglog(steps, kl, "o-", ms=3, lw=2 if name.startswith("optimised") else 1, label=name)
        ax.set_xlabel("steps T")
        ax.set_ylabel(r"exact KL to $p_{t_{min}}$")
        ax.set_title(f"(c) {sampler_name}")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out, "c_steps_sweep.png", plt))
    log("\nfigures: " + ", ".join(os.path.abspath(p) for p in paths))
    return paths


def _save(fig, out, name, plt):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
