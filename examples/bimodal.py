"""Bimodal target: training with the online schedule update against the fixed linear schedule.

The paper's Figures 2-4. A 1-D two-mode mixture (`models.bimodal()`: modes at +-1,
std 0.1), `vp_linear`, T levels. The same MLP and budget, trained three ways from the
uniform ("linear") schedule, for each of SEEDS seeds:

- "fixed linear": on the linear schedule's levels throughout;
- "online, intervals": Algorithm 2 as in the paper (`OnlineSchedule(route="intervals")`):
  after a burn-in, every EVERY steps the interval corrector costs of the current
  schedule, Algorithm 1, and a blend with rate GAMMA;
- "online, dense grid": the same loop with the dense-grid map as the target
  (`route="grid"`, derived here: docs/derivations.md section 4), every GRID_EVERY steps.

Every EVAL_EVERY steps each run is evaluated: the average log-likelihood under the true
p_0 of ancestral samples on the run's current schedule, and the sigma^2-weighted score
error on the linear schedule's levels. At the end: W1 beside the likelihood (which rewards
samples too concentrated at the modes), and the score error per noise level, which says
where each model is accurate. Every number is a mean over the seeds with its standard
error. With exact scores, the linear, corrector-optimised (dense grid) and
predictor-optimised (equal DDIM cost) schedules are compared too.

Figures: (a) log-likelihood and score error against training iterations; (b) the score
error per level; (c) the per-step costs at the first and the last online update and the
schedule's progression; (d) the exact-score schedules and their sample densities.

    python examples/bimodal.py            # about 4 minutes on 2 cores (3 seeds)
    python examples/bimodal.py --quick    # about 30 s (2 seeds, short runs)
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

import models
import sampler as sm
import scoreopt as so

T = 50                       # levels of every schedule, and sampling steps
SAMPLER = "ancestral"
SEEDS = 3
MODEL = dict(width=64, depth=3)
TRAIN = dict(n_steps=4000, batch_size=256, lr=3e-3)
BURN_IN, EVERY, GAMMA = 1000, 50, 0.1           # the interval route, as in the paper's experiment
GRID_EVERY, GRID_GAMMA = 250, 0.3                # the dense-grid route: fewer, larger updates
EVAL_EVERY = 500
N_EVAL, N_FINAL = 4_000, 20_000                  # samples per evaluation during training / at the end
N_GRID = 250                                     # levels of the exact-score schedule map
PREDICTOR_ITER = 60
QUICK = dict(seeds=2, n_steps=600, burn_in=200, every=50, gamma=0.3, grid_every=100, grid_gamma=0.5, grid_levels=100,
             online_samples=400, eval_every=300, n_eval=1000, n_final=2000, n_held_out=1000, predictor_iter=10)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "bimodal")
RUNS = ("fixed linear", "online, intervals", "online, dense grid")


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    cfg, out = settings(argv)
    begin = time.perf_counter()
    process, target = so.vp_linear(), models.bimodal()
    exact = lambda x, t: target.score(x, t, process)
    linear = so.uniform_schedule(process, T)

    # 1. Train the three runs for every seed, from the same initial model and data.
    log(f"Training {len(RUNS)} x {cfg['seeds']} {MODEL['depth']}x{MODEL['width']} MLPs for {cfg['n_steps']} steps, "
        f"T = {T}:")
    online = {"fixed linear": None,
              "online, intervals": models.OnlineSchedule(every=cfg["every"], burn_in=cfg["burn_in"],
                                                         gamma=cfg["gamma"], route="intervals",
                                                         n_samples=cfg["online_samples"]),
              "online, dense grid": models.OnlineSchedule(every=cfg["grid_every"], burn_in=cfg["burn_in"],
                                                          gamma=cfg["grid_gamma"], route="grid",
                                                          n_grid=cfg["grid_levels"], n_samples=cfg["online_samples"])}
    runs = {name: [train(process, target, linear, online[name], seed, cfg, log, name) for seed in range(cfg["seeds"])]
            for name in RUNS}

    # 2. Each final model on its own schedule and on the linear one: likelihood, W1, score error per level.
    levels = so.loglinear_schedule(process, 12)
    held_out = target.sample(cfg["n_held_out"], 1000)
    final = {name: summarise([evaluate(r, process, target, linear, levels, held_out, cfg) for r in seeds])
             for name, seeds in runs.items()}

    # 3. Exact scores: the schedule's effect alone.
    smap = so.estimate_schedule_map(exact, process, target.sample(4000, 0), 1, n_grid=N_GRID)
    with warnings.catch_warnings():          # a fixed point short of convergence: the table says so
        warnings.filterwarnings("ignore", "the equal-cost iteration did not converge", RuntimeWarning)
        predictor = so.equal_cost_schedule(exact, process, smap.schedule(T), target.sample(1000, 2), 3,
                                           cost="predictor", max_iter=cfg["predictor_iter"], tol=1e-3)
    exact_runs = {name: sample_stats(exact, process, target, ts, cfg["n_final"], 40)
                  for name, ts in (("linear", linear), ("corrector-optimised", smap.schedule(T)),
                                   ("predictor-optimised", predictor.ts))}
    reference = sm.mean_log_density(target.marginal(process, process.t_min).sample(200_000, 50), target)

    report(final, exact_runs, smap, predictor, cfg, reference, log)
    figures = plot(runs, final, exact_runs, target, process, reference, out, log)
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return {"final": final, "curves": {n: [r["curve"] for r in seeds] for n, seeds in runs.items()},
            "exact": exact_runs, "reference_log_p0": reference, "Lambda": (smap.length, smap.length_stderr),
            "figures": figures}


# --------------------------------------------------------------------------------
# Training, evaluation and the report
# --------------------------------------------------------------------------------

def settings(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per training run (default {SEEDS})")
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer seeds, steps and samples)")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    cfg = dict(QUICK) if args.quick else dict(seeds=args.seeds, n_steps=TRAIN["n_steps"], burn_in=BURN_IN,
                                               every=EVERY, gamma=GAMMA, grid_every=GRID_EVERY,
                                               grid_gamma=GRID_GAMMA, grid_levels=200, online_samples=1000,
                                               eval_every=EVAL_EVERY, n_held_out=4000,
                                               n_eval=N_EVAL, n_final=N_FINAL, predictor_iter=PREDICTOR_ITER)
    return cfg, args.out


def train(process, target, linear, online, seed, cfg, log, name):
    """One training run, evaluated every ``eval_every`` steps: (step, mean log p0, score error)."""
    exact = lambda x, t: target.score(x, t, process)
    eval_x0, curve = target.sample(2000, seed + 5), []

    def callback(step, n_steps, info):
        if step % cfg["eval_every"] == 0 or step == n_steps:
            model = models.score_model(info["params"], process, target.mean(), target.variance())
            loglik = sample_stats(model, process, target, info["ts"], cfg["n_eval"], seed + 20)["loglik"]
            curve.append((step, loglik, sm.score_error(model, exact, process, linear, eval_x0, seed + 6).value))
    start = time.perf_counter()
    state = models.train(models.init_mlp(seed, **MODEL), target, process, linear, rng=seed, n_steps=cfg["n_steps"],
                         batch_size=TRAIN["batch_size"], lr=TRAIN["lr"], online=online, callback=callback)
    seconds = time.perf_counter() - start
    log(f"  {name:18s} seed {seed}: log p0 {curve[-1][1]:.3f}, score error {curve[-1][2]:.5f}, {seconds:.1f} s")
    return {"state": state, "curve": np.array(curve), "seconds": seconds}


def sample_stats(score, process, target, ts, n, seed):
    x_T = sm.prior_sample(process, n, target.variance(), seed)
    x = sm.sample(score, process, ts, x_T, seed + 1, predictor=SAMPLER).x
    return {"loglik": sm.mean_log_density(x, target), "w1": sm.wasserstein1(x, target.cdf), "x": x[:, 0], "ts": ts}


def evaluate(run, process, target, linear, levels, held_out, cfg):
    model = run["state"].score(process)
    exact = lambda x, t: target.score(x, t, process)
    own = sample_stats(model, process, target, run["state"].ts, cfg["n_final"], 30)
    on_linear = sample_stats(model, process, target, linear, cfg["n_final"], 30)
    per_level = sm.score_error_by_level(model, exact, process, levels, held_out, 8)
    costs = run["state"].history["costs"]
    return {"own": own["loglik"], "linear": on_linear["loglik"], "w1_own": own["w1"], "w1_linear": on_linear["w1"],
            "score_error": sm.score_error(model, exact, process, linear, held_out, 7).value,
            "per_level": per_level.score_error, "nu": per_level.nu, "seconds": run["seconds"],
            "spread": (costs[0].max() / costs[0].min(), costs[-1].max() / costs[-1].min()) if len(costs) else None}


def summarise(results):
    """Mean and standard error over seeds of every number (the spread of the costs: their range)."""
    out = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key == "spread":
            out[key] = None if values[0] is None else np.array(values)
        elif key == "nu":
            out[key] = values[0]
        else:
            values = np.array(values, dtype=float)
            out[key] = (values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(len(values)))
    return out


def report(final, exact_runs, smap, predictor, cfg, reference, log):
    n = cfg["seeds"]
    log(f"\nTrained models, T = {T}, {SAMPLER} sampler, {cfg['n_final']} samples, mean ± s.e. over {n} seeds; "
        "mean log p0 and W1 to p0 on the run's own final schedule and on the linear one; score error "
        "E sigma^2 |S_theta - S|^2 on the linear levels (held-out data):")
    log("| training | mean log p0, own / linear | W1, own / linear | score error | max/min interval cost, first / "
        "last update | time per run |")
    log("|---|---|---|---|---|---|")
    pm = lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}"
    for name, r in final.items():
        spread = "" if r["spread"] is None else f"{np.median(r['spread'][:, 0]):.3g} / {np.median(r['spread'][:, 1]):.3g}"
        log(f"| {name} | {pm(r['own'], '.3f')} / {pm(r['linear'], '.3f')} | {pm(r['w1_own'], '.4f')} / "
            f"{pm(r['w1_linear'], '.4f')} | {pm(r['score_error'], '.5f')} | {spread} | {r['seconds'][0]:.1f} s |")
    log(f"\nScore error E sigma^2 |S_theta - S|^2 per noise level (held-out data, mean over {n} seeds):")
    nu = final["fixed linear"]["nu"]
    log("| training | " + " | ".join(f"nu {v:.3g}" for v in nu) + " |")
    log("|---" * (len(nu) + 1) + "|")
    for name, r in final.items():
        log(f"| {name} | " + " | ".join(f"{v:.2g}" for v in r["per_level"][0]) + " |")
    log(f"\nExact scores, T = {T}, {SAMPLER} sampler (corrector map: Lambda = {smap.length:.3f} ± "
        f"{smap.length_stderr:.3f}; predictor fixed point: {predictor.n_iter} iterations, "
        f"{'converged' if predictor.converged else 'not converged'}):")
    log("| schedule | mean log p0 | W1 to p0 |\n|---|---|---|")
    for name, r in exact_runs.items():
        log(f"| {name} | {r['loglik']:.3f} | {r['w1']:.4f} |")
    log(f"\nReference: mean log p0 of exact samples of p_tmin is {reference:.3f}. Samples that are too "
        "concentrated at the modes score above it: the average likelihood rewards under-dispersion, W1 does not.")


def plot(runs, final, exact_runs, target, process, reference, out, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("\nmatplotlib is not installed: no figures (pip install -e '.[examples]' for them)")
        return []
    os.makedirs(out, exist_ok=True)
    colors = dict(zip(RUNS, ("tab:red", "tab:blue", "tab:green")))
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))            # (a) training curves, mean ± s.e.
    for name, seeds in runs.items():
        curves = np.array([r["curve"] for r in seeds])           # (seeds, evaluations, 3)
        step = curves[0, :, 0]
        for ax, k in ((axes[0], 1), (axes[1], 2)):
            mean, se = curves[:, :, k].mean(0), curves[:, :, k].std(0, ddof=1) / np.sqrt(len(seeds))
            ax.errorbar(step, mean, yerr=se, fmt="o-", ms=3, capsize=2, color=colors[name], label=name)
    axes[0].axhline(reference, color="black", ls="--", lw=1, label=r"exact samples of $p_{t_{min}}$")
    axes[0].set_ylabel(r"mean $\log p_0$ of samples (own schedule)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(r"score error $E\,\sigma^2\|S_\theta - S\|^2$ (linear levels)")
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.legend(fontsize=8)
    fig.suptitle(f"Bimodal, vp_linear, T = {T}: online schedule against the fixed linear one "
                 f"(mean ± s.e. over {len(runs[RUNS[0]])} seeds)")
    paths.append(_save(fig, out, "a_training_curves.png", plt))

    fig, ax = plt.subplots(figsize=(6.5, 3.8))                   # (b) score error per level
    for name, r in final.items():
        mean, se = r["per_level"]
        ax.errorbar(r["nu"], mean, yerr=se, fmt="o-", ms=3, capsize=2, color=colors[name], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"noise level $\nu$")
    ax.set_ylabel(r"$E\,\sigma^2\|S_\theta - S\|^2$")
    ax.set_title("Score error per level of the final models (held-out data)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "b_score_error_per_level.png", plt))

    online = [n for n in RUNS if len(runs[n][0]["state"].history["costs"])]
    fig, axes = plt.subplots(2, len(online), figsize=(5.5 * len(online), 7), squeeze=False)   # (c) costs, progression
    for column, name in enumerate(online):
        hist = runs[name][0]["state"].history
        axes[0, column].semilogy(np.arange(1, T + 1), hist["costs"][0], "o-", ms=3, color="gray", label="first update")
        axes[0, column].semilogy(np.arange(1, T + 1), hist["costs"][-1], "o-", ms=3, color=colors[name],
                                 label="last update")
        axes[0, column].set_xlabel("interval i (1 = data end)")
        axes[0, column].set_ylabel(r"interval cost $L_i$")
        axes[0, column].set_title(f"{name} (seed 0)")
        axes[0, column].legend(fontsize=8)
        nu = so.nsr(process, hist["schedules"].ravel()).reshape(hist["schedules"].shape)
        for i in range(1, T, max(1, T // 10)):
            axes[1, column].semilogy(hist["update_step"], nu[:, i], color=colors[name], lw=1)
        axes[1, column].set_xlabel("training iteration")
        axes[1, column].set_ylabel(r"$\nu(t_i)$, every %d-th level" % max(1, T // 10))
    fig.suptitle("Per-step costs before the first and the last online update, and the schedule's progression")
    paths.append(_save(fig, out, "c_costs_and_progression.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))            # (d) exact-score schedules and densities
    grid = np.linspace(-1.6, 1.6, 801)
    axes[1].plot(grid, np.exp(target.log_prob(grid[:, None])), color="black", lw=1.2, label="$p_0$")
    for (name, r), color in zip(exact_runs.items(), ("tab:red", "tab:orange", "tab:purple")):
        axes[0].semilogy(np.arange(T + 1), so.nsr(process, r["ts"]), "o-", ms=2, color=color, label=name)
        axes[1].plot(grid, sm.density_estimate(r["x"], grid, 0.05), color=color, lw=1, label=name)
    axes[0].set_xlabel("step i (0 = data end)")
    axes[0].set_ylabel(r"noise level $\nu(t_i)$")
    axes[1].set_xlabel("x")
    axes[1].set_ylabel("density (KDE of samples)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Exact scores, {SAMPLER} sampler, T = {T}: three schedules and their samples")
    paths.append(_save(fig, out, "d_schedules_and_densities.png", plt))
    log("\nfigures: " + ", ".join(os.path.abspath(p) for p in paths))
    return paths


def _save(fig, out, name, plt):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for the script only (README)
    main(sys.argv[1:])
