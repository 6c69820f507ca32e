"""Mollified Cantor: the linear schedule misses modes that the optimised one fills (the paper's Figure 1).

Eight narrow modes, the `vp_linear` process, T = 20 ancestral steps; `main` tells it in order: exact
scores, then two trained models, then the table and the figures (the true density, the samples, the
schedules).

    python examples/cantor.py             # 47 s on 2 cores at a load of 1 to 2 (72 s of CPU)
    python examples/cantor.py --quick     # about 20 s
    python examples/cantor.py --seed 1 --out /tmp/cantor
"""
import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import models
import sampler as sm
import scoreopt as so

T, SAMPLER = 20, "ancestral"               # sampling steps (the levels the models train between); DDPM's step
N_SAMPLES, N_COST, N_GRID = 20_000, 4_000, 250   # samples per density; data and levels behind each map
N_MODEL_MAP = 2_000                        # data behind the trained model's own map (its Lambda in the table)
MODEL = dict(width=64, depth=3)
TRAIN = dict(n_steps=9000, batch_size=256, lr=5e-3, levels="between",   # lr decays by a cosine; the gradient
             gradient=models.dsm_loss_and_grad)                          # by hand: autograd's, 2x faster
BURN_IN, EVERY, GAMMA = 1500, 500, 0.5     # Algorithm 2: first update, then one every EVERY steps, blend rate
ONLINE = dict(route="grid", n_grid=100, n_samples=1000)    # each update: a 100-level map from 1,000 samples
QUICK = (1500, 500, 5000)                  # --quick: training steps, burn-in, samples per density
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "cantor")


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    args, begin = settings(argv), time.perf_counter()
    n_steps, burn_in, n = QUICK if args.quick else (TRAIN["n_steps"], BURN_IN, N_SAMPLES)
    process, target, seed = so.vp_linear(), models.mollified_cantor(), args.seed
    exact = lambda x, t: target.score(x, t, process)
    linear = so.uniform_schedule(process, T)
    sample = lambda score, ts: evaluate(score, process, target, ts, n, seed + 10)    # the same noise for all

    # 2. (started first: the longest part) Trained models, the same MLP, budget and seed: on the linear
    #    schedule's levels, and optimised by Algorithm 2, the map re-estimated from the model itself and
    #    blended in; each on its own final schedule. They train in two worker processes while this one works.
    log(f"Training two {MODEL['depth']}x{MODEL['width']} MLPs for {n_steps} steps, side by side (the optimised "
        f"one updates its schedule from step {burn_in} on, every {EVERY} steps):")
    online = models.OnlineSchedule(every=EVERY, burn_in=burn_in, gamma=GAMMA, **ONLINE)
    with training_pool() as pool:
        runs = {name: pool.submit(train, name, process, target, linear, seed, n_steps, schedule)
                for name, schedule in (("linear", None), ("optimised", online))}

        # 1. Exact scores, the schedule's effect alone: the linear schedule against the corrector-optimised map.
        smap = so.estimate_schedule_map(exact, process, target.sample(N_COST, seed), seed + 1, n_grid=N_GRID)
        results = {"T": T, "exact": {"linear": sample(exact, linear), "optimised": sample(exact, smap.schedule(T)),
                                     "Lambda": (smap.length, smap.length_stderr)}, "trained": {}}
        figures = plot(results, "exact", target, process, args.out, log)      # while the models train

        for name, run in runs.items():                   # each model as soon as it is trained (linear first)
            state, seconds = run.result()
            model = state.score(process)
            results["trained"][name] = dict(sample(model, state.ts), seconds=seconds, per_level=sm.score_error_by_level(
                model, exact, process, so.loglinear_schedule(process, 8), target.sample(N_COST, seed + 3), seed + 4))
    smap = so.estimate_schedule_map(model, process, target.sample(N_MODEL_MAP, seed + 2), seed + 3, n_grid=N_GRID)
    results["trained"]["Lambda"] = (smap.length, smap.length_stderr)    # and the optimised model's own map

    # 3. The table; 4. the figures.
    report(results, n, log)
    figures = plot(results, "trained", target, process, args.out, log) + figures
    log("\nfigures: " + ", ".join(os.path.abspath(p) for p in figures))
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return dict(results, figures=figures)


def train(name, process, target, ts, seed, n_steps, online):
    """One training run and its seconds."""
    start = time.perf_counter()
    state = models.train(models.init_mlp(seed, **MODEL), target, process, ts, rng=seed, **dict(TRAIN, n_steps=n_steps),
                         online=online, callback=so.progress_printer(f"  training {name:9s}", lines=4))
    return state, time.perf_counter() - start


def evaluate(score, process, target, ts, n, seed):
    """Samples on ``ts``: W1 to p_0, modes covered, mass near the atoms, samples thrown far away."""
    x_T = sm.prior_sample(process, n, target.variance(), seed)
    x = sm.sample(score, process, ts, x_T, seed + 1, predictor=SAMPLER, max_growth=None).x
    cover, (lo, hi) = sm.mode_coverage(x, target.atoms), target.interval
    far = (x[:, 0] < lo - (hi - lo)) | (x[:, 0] > hi + (hi - lo))
    return {"x": x[:, 0], "ts": ts, "w1": sm.wasserstein1(x, target.cdf), "modes": cover.covered,
            "mass": float(cover.masses.sum()), "escaped": int(far.sum()),
            "w1_rest": sm.wasserstein1(x[~far], target.cdf)}


# Helpers: the workers that train, the table, the figures, the arguments -------------------------------

def training_pool():
    """Two fresh (spawned) worker processes with the allocator opt-in and one BLAS thread, set before they import
    NumPy (small matrices: more threads oversubscribe two cores, 4.6 times slower at 0.2.0)."""
    os.environ.update(dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                               initializer=models.retain_freed_memory)


def report(results, n, log):
    log(f"\nMollified Cantor (8 modes), vp_linear, {SAMPLER} sampler, T = {T}, {n} samples; W1 to p_0, modes "
        "holding half their share, mass within a quarter spacing of the atoms:")
    log("| scores | schedule | W1 | modes covered | mass near atoms | samples escaped (> 1 interval away) | "
        "W1 without them | Lambda ± s.e. of the map |\n|---|---|---|---|---|---|---|---|")
    for kind in ("exact", "trained"):
        for name in ("linear", "optimised"):
            r, lam = results[kind][name], "{:.3f} ± {:.3f}".format(*results[kind]["Lambda"])
            log(f"| {kind} | {name} | {r['w1']:.4f} | {r['modes']} / 8 | {r['mass']:.3f} | {r['escaped']} | "
                f"{r['w1_rest']:.4f} | {lam if name == 'optimised' else ''} |")
    nu = results["trained"]["linear"]["per_level"].nu
    log("\nTrained models' score error E sigma^2 |S_theta - S|^2 per noise level (held-out data):")
    log("| model | " + " | ".join(f"nu {v:.3g}" for v in nu) + " |\n" + "|---" * (len(nu) + 1) + "|")
    for name in ("linear", "optimised"):
        log(f"| {name} | " + " | ".join(f"{v:.2g}" for v in results["trained"][name]["per_level"].score_error) + " |")


def plot(results, kind, target, process, out, log):
    """Figure 1 (``kind="trained"``, models) or 2 (``"exact"`` scores): p_0, the two sample densities, the
    schedules. Returns the list of paths written (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if kind == "exact":                     # said once: the exact figure is drawn first
            log("\nmatplotlib is not installed: no figures (pip install -e '.[examples]' for them)")
        return []
    os.makedirs(out, exist_ok=True)
    grid, paths = np.linspace(-0.1, 1.1, 1201), []
    true = np.exp(target.log_prob(grid[:, None]))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.7))
    axes[0].plot(grid, true, color="black", lw=1)
    axes[0].set(title="true density $p_0$", xlabel="x", ylabel="density", ylim=(0, 1.15 * true.max()))
    for ax, name, color in ((axes[1], "linear", "tab:red"), (axes[2], "optimised", "tab:blue")):
        r = results[kind][name]
        ax.plot(grid, true, color="black", lw=0.6, alpha=0.5, label="$p_0$")
        ax.hist(r["x"], bins=240, range=(grid[0], grid[-1]), density=True, color=color, alpha=0.7, label="samples")
        ax.set(xlabel="x", ylabel="density", ylim=axes[0].get_ylim())
        ax.set_title(f"{name} schedule\n{r['modes']}/8 modes, W1 {r['w1']:.3g}"
                     + (f", {r['escaped']} escaped" if r["escaped"] else ""), fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        axes[3].semilogy(so.nsr(process, r["ts"]), "o-", ms=3, color=color, label=name)
    axes[3].set(xlabel="step i (0 = data end)", ylabel=r"noise level $\nu(t_i)$", title="schedules")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"Mollified Cantor, vp_linear, {SAMPLER} sampler, T = {T}, "
                 + ("trained MLP" if kind == "trained" else "exact scores"))
    fig.tight_layout()
    paths.append(os.path.join(out, f"cantor_{kind}.png"))          # docs/cantor.png is cantor_exact.png
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def settings(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and samples)")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    return parser.parse_args(argv)


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for the script only (README)
    main(sys.argv[1:])
