"""Bimodal target: training with the online schedule update against the fixed linear schedule.

The paper's Figures 2-4. A 1-D two-mode mixture (`models.bimodal()`:
modes at +-1, std 0.1), `vp_linear`, T levels. The same MLP, budget and seed,
trained three ways from the uniform ("linear") schedule:

- "fixed linear": on the linear schedule's levels throughout;
- "online, intervals": Algorithm 2 as in the paper (`OnlineSchedule(route=
  "intervals")`): after a burn-in, every EVERY steps the interval corrector costs of
  the current schedule, Algorithm 1, and a blend with rate GAMMA;
- "online, dense grid": the same loop with the dense-grid map as the target
  (`route="grid"`, derived here: docs/derivations.md section 4).

Every EVAL_EVERY steps each run is evaluated: the average log-likelihood under the
true p_0 of ancestral samples drawn on the run's current schedule, and the
sigma^2-weighted score error on the linear schedule's levels (the same yardstick
for all runs). With exact scores, the linear, corrector-optimised (dense grid) and
predictor-optimised (equal DDIM cost, fixed point) schedules are compared too.

Figures: (a) log-likelihood and score error against training iterations; (b) the
per-step costs of the schedule at the first and the last online update; (c) the
schedule's progression during training; (d) the three schedules and their sample
densities against the truth.

    python examples/bimodal.py            # about 2 minutes on 2 cores
    python examples/bimodal.py --quick    # about 20 s
"""
import argparse
import os
import sys
import time

import numpy as np

import models
import sampler as sm
import scoreopt as so

T = 50                       # levels of every schedule, and sampling steps
SAMPLER = "ancestral"
MODEL = dict(width=64, depth=3)
TRAIN = dict(n_steps=4000, batch_size=256, lr=3e-3)
BURN_IN, EVERY, GAMMA = 1000, 50, 0.1
EVAL_EVERY = 500
N_EVAL = 5_000               # samples per log-likelihood evaluation during training
N_FINAL = 20_000             # samples for the final numbers and densities
PREDICTOR_ITER = 60          # cap on the fixed-point iterations of the predictor-optimised schedule
QUICK = dict(n_steps=800, burn_in=300, every=50, gamma=0.3, eval_every=400, n_eval=1000, n_final=4000,
             predictor_iter=10)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "bimodal")
RUNS = ("fixed linear", "online, intervals", "online, dense grid")


def mean_log_p0(score, process, target, ts, n, seed):
    x_T = sm.prior_sample(process, n, target.variance(), seed)
    x, _ = sm.sample(score, process, ts, x_T, seed + 1, predictor=SAMPLER)
    return sm.mean_log_density(x, target), x[:, 0]


def train_runs(process, target, cfg, seed, log):
    """The three training runs, each evaluated every ``eval_every`` steps."""
    linear = so.uniform_schedule(process, T)
    settings = dict(every=cfg["every"], burn_in=cfg["burn_in"], gamma=cfg["gamma"])
    online = {"fixed linear": None,
              "online, intervals": models.OnlineSchedule(**settings),
              "online, dense grid": models.OnlineSchedule(**settings, route="grid")}
    exact = lambda x, t: target.score(x, t, process)
    eval_x0 = target.sample(2000, seed + 5)
    runs = {}
    for name in RUNS:
        curve = []

        def callback(step, n_steps, info):
            if step % cfg["eval_every"] == 0 or step == cfg["n_steps"]:
                model = models.score_model(info["params"], process, target.mean(), target.variance())
                loglik, _ = mean_log_p0(model, process, target, info["ts"], cfg["n_eval"], seed + 20)
                err, _ = sm.score_error(model, exact, process, linear, eval_x0, seed + 6)
                curve.append((step, loglik, err))
                log(f"  {name:18s} step {step:5d}/{cfg['n_steps']}  loss {info['loss']:.4f}  log p0 {loglik:7.3f}  "
                    f"score error {err:.5f}  {info['elapsed']:.1f} s")
        start = time.perf_counter()
        out = models.train(models.init_mlp(seed, **MODEL), target, process, linear, rng=seed,
                           n_steps=cfg["n_steps"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
                           online=online[name], callback=callback)
        runs[name] = {"state": out, "curve": np.array(curve), "seconds": time.perf_counter() - start}
    return runs


def exact_schedules(process, target, seed, max_iter):
    """Linear, corrector-optimised (dense grid) and predictor-optimised (equal L_p) schedules."""
    exact = lambda x, t: target.score(x, t, process)
    smap = so.estimate_schedule_map(exact, process, target.sample(4000, seed), seed + 1)
    pred = so.equal_cost_schedule(exact, process, smap.schedule(T), target.sample(1000, seed + 2), seed + 3,
                                  cost="predictor", gamma=0.5, max_iter=max_iter, tol=1e-3)
    return {"linear": so.uniform_schedule(process, T), "corrector-optimised": smap.schedule(T),
            "predictor-optimised": pred.ts}, smap, pred


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and samples)")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    cfg = dict(QUICK) if args.quick else dict(n_steps=TRAIN["n_steps"], burn_in=BURN_IN, every=EVERY, gamma=GAMMA,
                                               eval_every=EVAL_EVERY, n_eval=N_EVAL, n_final=N_FINAL,
                                               predictor_iter=PREDICTOR_ITER)
    begin = time.perf_counter()
    process, target = so.vp_linear(), models.bimodal()
    exact = lambda x, t: target.score(x, t, process)

    log(f"Training three {MODEL['depth']}x{MODEL['width']} MLPs for {cfg['n_steps']} steps "
        f"(online: burn-in {cfg['burn_in']}, every {cfg['every']}, gamma {cfg['gamma']}), T = {T}:")
    runs = train_runs(process, target, cfg, args.seed, log)
    final = {}
    for name, run in runs.items():
        model = run["state"].score(process)
        own, x_own = mean_log_p0(model, process, target, run["state"].ts, cfg["n_final"], args.seed + 30)
        linear, x_linear = mean_log_p0(model, process, target, so.uniform_schedule(process, T), cfg["n_final"],
                                       args.seed + 30)
        err, se = sm.score_error(model, exact, process, so.uniform_schedule(process, T),
                                 target.sample(4000, args.seed + 7), args.seed + 8)
        costs = run["state"].history["costs"]
        spread = (costs[0].max() / costs[0].min(), costs[-1].max() / costs[-1].min()) if len(costs) else None
        final[name] = {"own": own, "linear": linear, "score_error": (err, se), "spread": spread,
                       "w1_own": sm.wasserstein1(x_own, target.cdf), "w1_linear": sm.wasserstein1(x_linear, target.cdf),
                       "first_levels": run["state"].ts[:3], "seconds": run["seconds"]}

    schedules, smap, pred = exact_schedules(process, target, args.seed, cfg["predictor_iter"])
    densities = {}
    for name, ts in schedules.items():
        loglik, x = mean_log_p0(exact, process, target, ts, cfg["n_final"], args.seed + 40)
        densities[name] = {"loglik": loglik, "x": x, "w1": sm.wasserstein1(x, target.cdf), "ts": ts}

    reference = sm.mean_log_density(target.marginal(process, process.t_min).sample(200_000, args.seed + 50), target)
    report(final, densities, smap, pred, cfg, reference, log)
    figures = plot(runs, densities, target, process, reference, args.out, log)
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return {"final": final, "curves": {n: r["curve"] for n, r in runs.items()}, "exact": densities,
            "reference_log_p0": reference,
            "Lambda": (smap.length, smap.length_stderr), "figures": figures}


def report(final, densities, smap, pred, cfg, reference, log):
    log(f"\nTrained models, T = {T}, {SAMPLER} sampler, {cfg['n_final']} samples; mean log p0 and W1 to p0 "
        "on the run's own final schedule and on the linear one; score error E sigma^2 |S_theta - S|^2 on the "
        "linear levels:")
    log("| training | first levels of the final schedule | mean log p0, own / linear | W1, own / linear | "
        "score error | max/min interval cost, first / last update | time |")
    log("|---|---|---|---|---|---|---|")
    for name, r in final.items():
        spread = "" if r["spread"] is None else f"{r['spread'][0]:.3g} / {r['spread'][1]:.3g}"
        levels = ", ".join(f"{t:.3f}" for t in r["first_levels"])
        log(f"| {name} | {levels}, … | {r['own']:.3f} / {r['linear']:.3f} | {r['w1_own']:.4f} / "
            f"{r['w1_linear']:.4f} | {r['score_error'][0]:.5f} ± "
            f"{r['score_error'][1]:.5f} | {spread} | {r['seconds']:.1f} s |")
    log(f"\nExact scores, T = {T}, {SAMPLER} sampler (corrector map: Lambda = {smap.length:.3f} ± "
        f"{smap.length_stderr:.3f}; predictor fixed point: {pred.n_iter} iterations, "
        f"{'converged' if pred.converged else 'not converged'}):")
    log("| schedule | mean log p0 | W1 to p0 |\n|---|---|---|")
    for name, r in densities.items():
        log(f"| {name} | {r['loglik']:.3f} | {r['w1']:.4f} |")
    log(f"\nReference: mean log p0 of exact samples of p_tmin is {reference:.3f}. Samples that are too "
        "concentrated at the modes score above it: the average likelihood rewards under-dispersion, "
        "W1 does not.")


def plot(runs, densities, target, process, reference, out, log):
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

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))            # (a) training curves
    for name, run in runs.items():
        step, loglik, err = run["curve"].T
        axes[0].plot(step, loglik, "o-", ms=3, color=colors[name], label=name)
        axes[1].semilogy(step, err, "o-", ms=3, color=colors[name], label=name)
    axes[0].axhline(reference, color="black", ls="--", lw=1, label=r"exact samples of $p_{t_{min}}$")
    axes[0].set_ylabel(r"mean $\log p_0$ of samples (own schedule)")
    axes[1].set_ylabel(r"score error $E\,\sigma^2\|S_\theta - S\|^2$")
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.legend(fontsize=8)
    fig.suptitle(f"Bimodal, vp_linear, T = {T}: online schedule against the fixed linear one")
    paths.append(_save(fig, out, "a_training_curves.png", plt))

    online = [n for n in RUNS if len(runs[n]["state"].history["costs"])]
    fig, axes = plt.subplots(1, len(online), figsize=(5.5 * len(online), 3.8), squeeze=False)   # (b) costs
    for ax, name in zip(axes[0], online):
        costs = runs[name]["state"].history["costs"]
        ax.semilogy(np.arange(1, T + 1), costs[0], "o-", ms=3, color="gray", label="first update")
        ax.semilogy(np.arange(1, T + 1), costs[-1], "o-", ms=3, color=colors[name], label="last update")
        ax.set_xlabel("interval i (1 = data end)")
        ax.set_ylabel(r"interval cost $L_i$")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle("Per-step costs of the schedule before the first and the last online update")
    paths.append(_save(fig, out, "b_interval_costs.png", plt))

    fig, axes = plt.subplots(1, len(online), figsize=(5.5 * len(online), 3.8), squeeze=False)   # (c) progression
    for ax, name in zip(axes[0], online):
        hist = runs[name]["state"].history
        nu = so.nsr(process, hist["schedules"].ravel()).reshape(hist["schedules"].shape)
        for i in range(1, T, max(1, T // 10)):
            ax.semilogy(hist["update_step"], nu[:, i], color=colors[name], lw=1)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(r"$\nu(t_i)$, every %d-th level" % max(1, T // 10))
        ax.set_title(name)
    fig.suptitle("The schedule's progression during training")
    paths.append(_save(fig, out, "c_schedule_progression.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))            # (d) schedules and densities
    grid = np.linspace(-1.6, 1.6, 801)
    axes[1].plot(grid, np.exp(target.log_prob(grid[:, None])), color="black", lw=1.2, label="$p_0$")
    for (name, r), color in zip(densities.items(), ("tab:red", "tab:orange", "tab:purple")):
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
