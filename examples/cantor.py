"""Mollified Cantor target: the linear schedule misses modes that the optimised one fills.

The paper's Figure 1. Eight narrow modes (`models.mollified_cantor()`), the `vp_linear`
process, T steps of the ancestral sampler (the DDPM posterior step). Read top to bottom:

1. Exact scores: the schedule's effect alone. The corrector-optimised schedule is the
   dense-grid schedule map of the paper (`estimate_schedule_map`), estimated from the exact
   score; the linear one is uniform in t.
2. Trained models. The same small MLP, the same budget and seed, trained twice, side by
   side (one per core): "linear" on (continuous times between) the levels of the linear
   schedule; "optimised" the same for BURN_IN steps, then every EVERY steps the
   corrector-optimised schedule is estimated *from the model itself* and blended in with
   rate GAMMA (Algorithm 2, dense-grid route); each model is sampled on its own final
   schedule. The models are EDM-preconditioned (`models.mlp_score`, the default).

Printed: W1 to p_0 (exact CDF), modes holding half their share, mass within a quarter
mode spacing of the atoms, the samples a model throws more than one interval away (counted
rather than refused), Lambda of each schedule map, and the trained models' score error per
noise level. Figures (PNG, matplotlib from the `examples` extra): the true density, the
two sample densities and the two schedules (nu against step), trained and exact.

    python examples/cantor.py             # about 55 s on 2 cores
    python examples/cantor.py --quick     # about 20 s
    python examples/cantor.py --seed 1 --out /tmp/cantor
"""
import os

if __name__ == "__main__":
    # One BLAS thread per process, set before NumPy loads: the matrices here are small, and the
    # two trainings run side by side on the two cores (measured: 51 s for the whole script,
    # against 235 s with the default threads). Process-wide, so only when run as a script.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import models
import sampler as sm
import scoreopt as so

T = 20                       # sampling steps; also the levels the models train on
SAMPLER = "ancestral"        # DDPM posterior step (k-diffusion's sample_euler_ancestral)
N_SAMPLES = 20_000           # generated samples per density
N_COST, N_GRID = 4_000, 250  # data samples and levels behind each schedule map
MODEL = dict(width=64, depth=3)
TRAIN = dict(n_steps=9000, batch_size=256, lr=5e-3, levels="between")
BURN_IN = 1500               # steps on the linear schedule before the optimised one is estimated
EVERY, GAMMA = 500, 0.5      # then re-estimated from the model every EVERY steps, blended with GAMMA
ONLINE = dict(n_grid=100, n_samples=2000)   # each re-estimate: a 100-level map from 2,000 samples
QUICK = dict(n_steps=1500, burn_in=500, n_samples=5000)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "cantor")


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    args = settings(argv)
    n_steps, burn_in, n = ((QUICK["n_steps"], QUICK["burn_in"], QUICK["n_samples"]) if args.quick
                           else (TRAIN["n_steps"], BURN_IN, N_SAMPLES))
    begin = time.perf_counter()
    process, target = so.vp_linear(), models.mollified_cantor()
    exact = lambda x, t: target.score(x, t, process)
    linear = so.uniform_schedule(process, args.steps)

    log(f"Training two {MODEL['depth']}x{MODEL['width']} MLPs for {n_steps} steps each, side by side (the "
        f"optimised one updates its schedule from step {burn_in} on, every {EVERY} steps):")
    with ProcessPoolExecutor(max_workers=2) as pool:
        # 2. Trained models, one per core: the same MLP, budget and seed; the optimised run
        #    re-estimates its schedule from the model itself (Algorithm 2, dense-grid route).
        jobs = {name: pool.submit(train, name, process, target, linear, args.seed, n_steps, burn_in)
                for name in ("linear", "optimised")}

        # 1. Meanwhile, exact scores: the corrector-optimised schedule map, both schedules sampled.
        exact_map = so.estimate_schedule_map(exact, process, target.sample(N_COST, args.seed), args.seed + 1,
                                             n_grid=N_GRID)
        results = {"T": args.steps, "exact": {
            "linear": evaluate(exact, process, target, linear, n, args.seed + 10),
            "optimised": evaluate(exact, process, target, exact_map.schedule(args.steps), n, args.seed + 10),
            "Lambda": (exact_map.length, exact_map.length_stderr)}}
        runs = {name: job.result() for name, job in jobs.items()}

    # The trained models on their own schedules, their error per level, the optimised one's own map.
    results["trained"] = {}
    for name, (run, seconds) in runs.items():
        model = run.score(process)
        results["trained"][name] = dict(evaluate(model, process, target, run.ts, n, args.seed + 10), seconds=seconds,
                                        per_level=sm.score_error_by_level(model, exact, process,
                                                                          so.loglinear_schedule(process, 8),
                                                                          target.sample(N_COST, args.seed + 3),
                                                                          args.seed + 4))
    model_map = so.estimate_schedule_map(runs["optimised"][0].score(process), process,
                                         target.sample(N_COST, args.seed + 2), args.seed + 3, n_grid=N_GRID)
    results["trained"]["Lambda"] = (model_map.length, model_map.length_stderr)

    report(results, n, log)
    figures = plot(results, target, process, args.out, log)
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return dict(results, figures=figures)


# --------------------------------------------------------------------------------
# Helpers: settings, evaluation, the table, the figures
# --------------------------------------------------------------------------------

def settings(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and samples)")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    parser.add_argument("--steps", type=int, default=T, help=f"sampling steps T (default {T})")
    return parser.parse_args(argv)


def train(name, process, target, linear, seed, n_steps, burn_in):
    """One of the two training runs (module level, so that a process pool can run it)."""
    online = None if name == "linear" else models.OnlineSchedule(every=EVERY, burn_in=burn_in, gamma=GAMMA,
                                                                 route="grid", **ONLINE)
    start = time.perf_counter()
    run = models.train(models.init_mlp(seed, **MODEL), target, process, linear, rng=seed, n_steps=n_steps,
                       batch_size=TRAIN["batch_size"], lr=TRAIN["lr"], levels=TRAIN["levels"], online=online,
                       callback=so.progress_printer(f"  training {name:9s}", lines=4))
    return run, time.perf_counter() - start


def evaluate(score, process, target, ts, n, seed):
    """Samples on schedule ``ts``: W1 to p_0, modes covered, mass near the atoms, and the
    samples a model throws far away (counted, not refused: ``max_growth=None``)."""
    x_T = sm.prior_sample(process, n, target.variance(), seed)
    x = sm.sample(score, process, ts, x_T, seed + 1, predictor=SAMPLER, max_growth=None).x
    cover = sm.mode_coverage(x, target.atoms)
    lo, hi = target.interval
    far = (x[:, 0] < lo - (hi - lo)) | (x[:, 0] > hi + (hi - lo))
    return {"x": x[:, 0], "ts": ts, "w1": sm.wasserstein1(x, target.cdf), "modes": cover.covered,
            "mass": float(cover.masses.sum()), "escaped": int(far.sum()),
            "w1_rest": sm.wasserstein1(x[~far], target.cdf)}


def report(results, n, log):
    log(f"\nMollified Cantor (8 modes), vp_linear, {SAMPLER} sampler, T = {results['T']}, {n} samples; "
        "W1 to p_0, modes holding half their share, mass within a quarter spacing of the atoms:")
    log("| scores | schedule | W1 | modes covered | mass near atoms | samples escaped (> 1 interval away) | "
        "W1 without them | Lambda ± s.e. of the map |")
    log("|---|---|---|---|---|---|---|---|")
    for kind in ("exact", "trained"):
        lam, se = results[kind]["Lambda"]
        for name in ("linear", "optimised"):
            r = results[kind][name]
            note = f"{lam:.3f} ± {se:.3f}" if name == "optimised" else ""
            log(f"| {kind} | {name} | {r['w1']:.4f} | {r['modes']} / 8 | {r['mass']:.3f} | {r['escaped']} | "
                f"{r['w1_rest']:.4f} | {note} |")
    levels = results["trained"]["linear"]["per_level"]
    log("\nTrained models' score error E sigma^2 |S_theta - S|^2 per noise level (held-out data):")
    log("| model | " + " | ".join(f"nu {v:.3g}" for v in levels.nu) + " |")
    log("|---" * (len(levels.nu) + 1) + "|")
    for name in ("linear", "optimised"):
        log(f"| {name} | " + " | ".join(f"{v:.2g}" for v in results["trained"][name]["per_level"].score_error) + " |")


def plot(results, target, process, out, log):
    """Figure 1 (trained) and Figure 2 (exact scores); returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("\nmatplotlib is not installed: no figures (pip install -e '.[examples]' for them)")
        return []
    os.makedirs(out, exist_ok=True)
    grid = np.linspace(-0.1, 1.1, 1201)
    true = np.exp(target.log_prob(grid[:, None]))
    paths = []
    for number, kind in ((1, "trained"), (2, "exact")):
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.7))
        axes[0].plot(grid, true, color="black", lw=1)
        axes[0].set_title("true density $p_0$")
        for ax, name, color in ((axes[1], "linear", "tab:red"), (axes[2], "optimised", "tab:blue")):
            r = results[kind][name]
            ax.plot(grid, true, color="black", lw=0.6, alpha=0.5, label="$p_0$")
            ax.hist(r["x"], bins=240, range=(grid[0], grid[-1]), density=True, color=color, alpha=0.7,
                    label="samples")
            stray = f", {r['escaped']} escaped" if r["escaped"] else ""
            ax.set_title(f"{name} schedule\n{r['modes']}/8 modes, W1 {r['w1']:.3g}{stray}", fontsize=10)
            ax.legend(loc="upper right", fontsize=8)
        for ax in axes[:3]:
            ax.set_xlabel("x")
            ax.set_ylabel("density")
            ax.set_ylim(0, 1.15 * true.max())
        for name, color in (("linear", "tab:red"), ("optimised", "tab:blue")):
            ts = results[kind][name]["ts"]
            axes[3].semilogy(np.arange(len(ts)), so.nsr(process, ts), "o-", ms=3, color=color, label=name)
        axes[3].set_xlabel("step i (0 = data end)")
        axes[3].set_ylabel(r"noise level $\nu(t_i)$")
        axes[3].set_title("schedules")
        axes[3].legend(fontsize=8)
        scores = "trained MLP" if kind == "trained" else "exact scores"
        fig.suptitle(f"Mollified Cantor, vp_linear, {SAMPLER} sampler, T = {results['T']}, {scores}")
        fig.tight_layout()
        path = os.path.join(out, f"figure{number}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    log("\nfigures: " + ", ".join(os.path.abspath(p) for p in paths))
    return paths


if __name__ == "__main__":
    # Opt in to the allocator setting that makes training steps about 2x faster here
    # (process-wide, so only in this script, never in the library: README).
    models.retain_freed_memory()
    main(sys.argv[1:])
